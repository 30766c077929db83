"""JSON-lines collector: one line per event, or per (topic, step) for a per-parameter
statistic, each line written whole; ``read_events`` reads both kinds back as events."""

from __future__ import annotations

import json
import os

from dashboards.histograms import bins, bins_of
from hooks import Event, Vector, topics


class JSONLines:
    """Appends events to ``path`` as JSON objects, one per line, flushed after every batch.
    A per-parameter statistic is one line per step: ``{"topic", "step", "values": [...],
    "params": [...], "tags", "wall_time"}`` (``values[i]`` is parameter ``params[i]``'s).

    A batch is joined into one string and handed to the kernel with unbuffered writes, so a
    process killed mid-run leaves whole lines behind except possibly the last. A failed write
    (a full disk) raises to the bus, which counts it; the next write that succeeds first ends
    the line the failure may have torn, so every later line is whole again. NaN and Inf are
    written as the JSON extensions ``NaN``/``Infinity`` that Python's json reads back. A file
    removed mid-run (its folder deleted) is started again at its path, the fault counted. A
    histogram topic's sampled values are written as their buckets (``dashboards.histograms.
    bins``: min, max, num, sum, sum_squares, limits, counts), not value by value.
    """

    name = "JSONLines"
    vectors = True

    def __init__(self, path: str | os.PathLike, run_id: str | None = None) -> None:
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise ValueError(f"run_id must be a non-empty str or None, got {run_id!r}")
        self.run_id = run_id  # written as "run" on every line: runs sharing a file stay apart
        self.path = os.fspath(path)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        # unbuffered: nothing waits in a Python buffer to be lost on SIGKILL or kept after ENOSPC
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        self._torn = False

    def handle(self, events: list[Event | Vector]) -> None:
        if self._file.closed:
            return
        # a file removed under us (its run folder deleted mid-run) would take every later
        # line into an unlinked inode: start a new one at the path, and say so once
        removed = _unlinked(self._file)
        if removed:
            self._reopen()
        run = self.run_id
        dicts = (_line(e) for e in events) if run is None else \
            ({**_line(e), "run": run} for e in events)
        text = "".join(json.dumps(d, separators=(",", ":")) + "\n" for d in dicts)
        data = memoryview(("\n" + text if self._torn else text).encode("utf-8"))
        self._torn = True
        while data:
            n = self._file.write(data)
            data = data[n:]
        self._torn = False
        if removed:
            raise OSError(f"{self.path} was removed while the run wrote it; a new file was "
                          f"started there with this step's events")

    def _reopen(self) -> None:
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        old, self._file = self._file, open(self.path, "ab", buffering=0)  # noqa: SIM115
        old.close()
        self._torn = False

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _unlinked(f) -> bool:
    """True when the open file ``f`` no longer has a name (removed, or its folder deleted)."""
    try:
        return os.fstat(f.fileno()).st_nlink == 0
    except (AttributeError, OSError, ValueError):  # not a real file: nothing to tell
        return False


def _line(e: Event | Vector) -> dict:
    histogram = topics.is_histogram(e.topic)
    if type(e) is Vector and histogram:  # the samples' buckets, one numpy pass for all
        return {"topic": e.topic, "step": e.step, "values": bins_of(e.values),
                "params": e.params, "tags": e.tags, "wall_time": e.wall_time}
    d = e.to_dict()
    if histogram and isinstance(e.value, list):
        d["value"] = bins(e.value)
    return d


def read_events(path: str | os.PathLike) -> tuple[list[dict], list[tuple[int, str]]]:
    """Parse an events.jsonl file: the good records, one dict per event (``topic``, ``step``,
    ``value``, ``tags``, ``wall_time``; a per-parameter line becomes one per parameter, with
    ``tags["param"]``), and (line number, reason) of bad lines."""
    good: list[dict] = []
    bad: list[tuple[int, str]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append((n, f"not JSON: {exc.msg}"))
                continue
            except RecursionError:
                bad.append((n, "nested too deeply"))
                continue
            if isinstance(rec, dict) and "values" in rec and "value" not in rec:
                why = _expand_vector(rec, good)
                if why:
                    bad.append((n, why))
                continue
            if not isinstance(rec, dict) or not {"topic", "step", "value"} <= rec.keys():
                bad.append((n, "missing topic/step/value"))
                continue
            good.append(rec)
    return good, bad


def _expand_vector(rec: dict, out: list[dict]) -> str:
    values, params, tags = rec.get("values"), rec.get("params"), rec.get("tags", {})
    if "topic" not in rec or "step" not in rec:
        return "missing topic/step"
    if not isinstance(values, list) or not isinstance(params, list) or len(values) != len(params):
        return "values and params must be lists of one length"
    if not isinstance(tags, dict):
        return "tags must be an object"
    base = {k: v for k, v in rec.items() if k not in ("values", "params", "tags")}
    out.extend({**base, "value": v, "tags": {**tags, "param": p}}
               for v, p in zip(values, params))
    return ""
