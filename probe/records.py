"""Checks every record ``probe report`` uses: odd but valid JSON lines become a counted skip,
never a crash, and names from a file are printed and plotted as inert text.

``dashboards.read_events`` parses the lines; ``clean`` applies here to each record it returns
(a step of NaN, "abc", [1] or 10**400, a topic that is a list, null tags, a value too large
for a float). ``read_file`` falls back to a line-by-line parse of its own only when
``read_events`` itself fails on the file (100k-deep nesting raises RecursionError there).
"""

from __future__ import annotations

import json
import math
import os

from dashboards import read_events
from hooks import topics

# steps are int64 in TensorBoard's protos; a wider one cannot be a real step counter
_STEP_LIMIT = 2**63
# one line longer than this is skipped unparsed in the fallback reader (a 100 MB line costs
# seconds and gigabytes to decode for one record nobody can use)
MAX_LINE_BYTES = 16 * 2**20


def safe_text(s: object, limit: int = 200) -> str:
    """``s`` as printable text: control characters (ANSI escapes, newlines) shown as ``\\x..``
    escapes and the result cut to ``limit`` characters."""
    text = s if isinstance(s, str) else repr(s)
    out = []
    for c in text:
        if c.isprintable():
            out.append(c)
        else:
            o = ord(c)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000
                       else f"\\U{o:08x}")
        if len(out) > limit:
            return "".join(out[:limit]) + "..."
    return "".join(out)


def _step(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if -_STEP_LIMIT < v < _STEP_LIMIT else None
    if isinstance(v, float) and math.isfinite(v) and v.is_integer() and abs(v) < _STEP_LIMIT:
        return int(v)
    return None


def _number(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return float(v)
    except OverflowError:  # an int beyond float range: not a measurement
        return None


_HIST_NUMBERS = ("min", "max", "num", "sum", "sum_squares")


def _buckets(raw: dict) -> dict | None:
    """A histogram's buckets (as JSONLines writes them) with numbers checked, else None."""
    out: dict = {}
    for k in _HIST_NUMBERS:
        out[k] = _number(raw.get(k))
        if out[k] is None:
            return None
    for k in ("limits", "counts"):
        vals = raw.get(k)
        if not isinstance(vals, list):
            return None
        out[k] = [_number(x) for x in vals]
        if any(x is None for x in out[k]):
            return None
    return out if len(out["limits"]) == len(out["counts"]) else None


def clean(rec: object) -> tuple[dict | None, str]:
    """(the record normalised, "") or (None, why it cannot be used). Normalised: ``topic`` a
    str, ``step`` an int, ``value`` a float, a str, a list of floats or (a histogram topic)
    its buckets or None (no finite value), ``tags`` a dict whose
    ``param`` (if any) is a str, ``wall_time`` a finite float or None."""
    if not isinstance(rec, dict):
        return None, "not a JSON object"
    topic = rec.get("topic")
    if not isinstance(topic, str) or not topic:
        return None, "topic is not a non-empty string"
    step = _step(rec.get("step"))
    if step is None:
        return None, f"step {safe_text(rec.get('step'), 40)} is not an integer in int64 range"
    raw = rec.get("value")
    if isinstance(raw, str):
        value: float | str | list = raw
    elif isinstance(raw, list):
        nums = [_number(x) for x in raw]
        if any(x is None for x in nums):
            return None, "value list holds a non-number"
        value = nums
    elif isinstance(raw, dict) and topics.is_histogram(topic):
        value = _buckets(raw)
        if value is None:
            return None, "value object is not histogram buckets"
    elif raw is None and topics.is_histogram(topic):
        value = None
    else:
        value = _number(raw)
        if value is None:
            return None, "value is not a number, a string or a list of numbers"
    tags = rec.get("tags")
    if tags is None:
        tags = {}
    elif not isinstance(tags, dict):
        return None, "tags is not an object"
    param = tags.get("param")
    if param is not None and not isinstance(param, str):
        return None, "tags.param is not a string"
    tags = {"param": param} if param else {}
    wall = _number(rec.get("wall_time"))
    wall = wall if wall is not None and math.isfinite(wall) else None
    return {"topic": topic, "step": step, "value": value, "tags": tags, "wall_time": wall}, ""


def _expand(rec: dict) -> list:
    # the columnar line (one per topic per step) as per-value records, as read_events returns
    params, values = rec.get("params"), rec.get("values")
    if "value" in rec or not isinstance(params, list) or not isinstance(values, list):
        return [rec]
    if len(params) != len(values):
        return [None]
    base = {k: v for k, v in rec.items() if k not in ("params", "values")}
    out = []
    for p, v in zip(params, values):
        tags = base.get("tags")
        tags = {} if tags is None else dict(tags) if isinstance(tags, dict) else tags
        if isinstance(tags, dict) and isinstance(p, str) and p:
            tags["param"] = p
        out.append({**base, "value": v, "tags": tags})
    return out


def _read_lines(path: str) -> tuple[list, list[tuple[int, str]]]:
    good: list = []
    bad: list[tuple[int, str]] = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if len(line) > MAX_LINE_BYTES:
                bad.append((n, f"line longer than {MAX_LINE_BYTES >> 20} MiB"))
                continue
            text = line.decode("utf-8", errors="replace")
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as exc:
                bad.append((n, f"not JSON: {exc.msg}"))
                continue
            except RecursionError:
                bad.append((n, "nested too deeply"))
                continue
            if not isinstance(rec, dict):
                bad.append((n, "not a JSON object"))
                continue
            good.extend(_expand(rec))
    return good, bad


def read_file(path: str | os.PathLike) -> tuple[list[dict], list[tuple[int, str]],
                                                 dict[str, int]]:
    """(clean records, (line number, why) of unreadable lines, why -> count of the parsed
    records ``clean`` skipped) of one events.jsonl file."""
    path = os.fspath(path)
    try:
        raw, bad = read_events(path)
    except (RecursionError, MemoryError, ValueError):
        raw, bad = _read_lines(path)
    good: list[dict] = []
    skipped: dict[str, int] = {}
    for rec in raw:
        r, why = clean(rec)
        if r is None:
            skipped[why] = skipped.get(why, 0) + 1
        else:
            good.append(r)
    return good, bad, skipped
