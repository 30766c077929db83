"""Verdicts: for each instrumented quantity a healthy range, and a one-line warning when a run
leaves it. Works on clean records grouped by topic (``probe.report.Run.by_topic``).

``RANGES`` is the documented table (docs/dashboards.md shows it with its sources); ``check``
applies it. Each check reads the last sampled values (what the run is doing now) unless the
row says otherwise, so a transient at step 0 does not raise a warning for the whole run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from probe.records import safe_text

UPDATE_RATIO = (1e-4, 1e-2)  # around the 1e-3 rule of thumb
MIN_RATIO_SAMPLES = 4
NS_RESIDUAL_MAX = 0.6
COND_SHARE = 0.5  # of max_condition
MASK_SPARSITY_MAX = 0.9
COS_FILTERED_MIN = 0.5
RELEVANCE_RISE = 1.5
DEFAULT_MAX_CONDITION = 1e6  # KFAC's default


@dataclass(frozen=True)
class Range:
    """One documented healthy range."""

    topic: str
    healthy: str
    why: str
    source: str


RANGES: tuple[Range, ...] = (
    Range("anomaly/nonfinite", "0", "a NaN/Inf gradient: the step (or the next) is corrupt",
          "docs/resilience.md"),
    Range("anomaly/skipped_step", "0", "steps dropped by on_nonfinite='skip'",
          "docs/resilience.md"),
    Range("probe/dropped_events", "0", "telemetry lost to the bounded buffer",
          "docs/resilience.md"),
    Range("probe/collector_errors", "0", "a collector failed (disk full, ...)",
          "docs/resilience.md"),
    Range("update/ratio", f"median (of the total, else over parameters) over the second half "
          f"of the run (>= {MIN_RATIO_SAMPLES} samples) in "
          f"[{UPDATE_RATIO[0]:g}, {UPDATE_RATIO[1]:g}]",
          "far below: lr too low, weights barely move; far above: lr too high",
          "Karpathy, CS231n notes, 'Neural Networks Part 3': the update/weight ratio "
          "'should be somewhere around 1e-3'"),
    Range("muon/ns_residual", f"<= {NS_RESIDUAL_MAX:g} per parameter",
          "singular values outside NS's [0.68, 1.21] band: the update is not near-orthogonal",
          "the NS band [0.68, 1.21] measured in docs/muon.md for K. Jordan's quintic "
          "coefficients (blog post 'Muon', 2024) puts the residual at <= 0.55; demo 0.29-0.39"),
    Range("kfac/cond_A", f"< {COND_SHARE:g} x max_condition per layer",
          "at the bound, eigenvalue clipping, not damping, shapes the preconditioner",
          "project bound: docs/kfac.md (max_condition, default 1e6); demo max 2.5e3"),
    Range("kfac/cond_G", f"< {COND_SHARE:g} x max_condition per layer",
          "as kfac/cond_A", "docs/kfac.md"),
    Range("kfac/clipped_A", "0 at the last sample per layer",
          "A is rank-deficient (fewer rows than its side) or max_condition bites",
          "docs/kfac.md (eigenvalues below lambda_max / max_condition are raised)"),
    Range("kfac/clipped_G", "0 at the last sample per layer", "as kfac/clipped_A",
          "docs/kfac.md"),
    Range("falcon/mask_sparsity", f"<= {MASK_SPARSITY_MAX:g} per parameter",
          "the mask zeroes almost every frequency bin: little of the gradient is left",
          "project threshold (docs/falcon.md); demo 0.17-0.67"),
    Range("falcon/cos_raw_filtered", f">= {COS_FILTERED_MIN:g} per parameter",
          "the filtered gradient points away from the raw one",
          "project threshold (docs/falcon.md); demo 0.51-0.99"),
    Range("blocks/relevance", f"a frozen block's relevance stays below {RELEVANCE_RISE:g}x "
          f"its value when it froze", "the block may need to train again",
          "project threshold (docs/blocks.md: relevance decides what freezes)"),
)


@dataclass(frozen=True)
class Verdict:
    """A warning: the topic, the tag it concerns ('' for the total) and one line of text."""

    topic: str
    tag: str
    message: str

    def __str__(self) -> str:
        return self.message


def _num(r: dict) -> float | None:
    v = r["value"]
    return float(v) if isinstance(v, float | int) and not isinstance(v, bool) else None


def _per_tag(recs: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """param ('' = untagged) -> (step, value) in step order, in first-seen tag order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in recs:
        v = _num(r)
        if v is not None:
            out.setdefault(r["tags"].get("param", ""), []).append((r["step"], v))
    for s in out.values():
        s.sort(key=lambda sv: sv[0])
    return out


def _last(by_topic: Mapping[str, list[dict]], topic: str) -> dict[str, tuple[int, float]]:
    return {p: s[-1] for p, s in _per_tag(by_topic.get(topic, [])).items() if s}


def _worst(items: dict[str, tuple[int, float]], bad: Callable[[float], bool],
           key: Callable[[float], float]) -> list[tuple[str, int, float]]:
    hits = [(p, s, v) for p, (s, v) in items.items() if math.isfinite(v) and bad(v)]
    return sorted(hits, key=lambda h: key(h[2]))


def _names(hits: list[tuple[str, int, float]], fmt: str = "{:.3g}", n: int = 3) -> str:
    shown = ", ".join(f"{safe_text(p, 60) or 'total'} {fmt.format(v)}" for p, _, v in hits[:n])
    return shown + (f" (+{len(hits) - n} more)" if len(hits) > n else "")


def _counters(by_topic: Mapping[str, list[dict]]) -> list[Verdict]:
    out = []
    nf = [(r["step"], v) for r in by_topic.get("anomaly/nonfinite", [])
          if not r["tags"] and (v := _num(r)) is not None and v != 0]
    if nf:
        named = sorted({safe_text(r["tags"]["param"], 60)
                        for r in by_topic["anomaly/nonfinite"] if r["tags"]})
        who = f" (parameters: {', '.join(named[:3])}{', ...' if len(named) > 3 else ''})" \
            if named else ""
        out.append(Verdict("anomaly/nonfinite", "",
                           f"anomaly/nonfinite: {len(nf)} step(s) with NaN/Inf gradients, first "
                           f"at step {min(s for s, _ in nf)}{who}; healthy: 0"))
    sk = [v for r in by_topic.get("anomaly/skipped_step", []) if (v := _num(r))]
    if sk:
        out.append(Verdict("anomaly/skipped_step", "", f"anomaly/skipped_step: {len(sk)} step(s) "
                           f"skipped for a non-finite gradient; healthy: 0"))
    for topic in ("probe/dropped_events", "probe/collector_errors"):
        last = _last(by_topic, topic).get("")
        if last and last[1] > 0:
            out.append(Verdict(topic, "", f"{topic}: {last[1]:.0f} by step {last[0]} "
                               f"(telemetry is incomplete); healthy: 0"))
    return out


def _median(vals: list[float]) -> float:
    vals = sorted(vals)
    k = len(vals) // 2
    return vals[k] if len(vals) % 2 else 0.5 * (vals[k - 1] + vals[k])


def _update_ratio(by_topic: Mapping[str, list[dict]]) -> list[Verdict]:
    # the untagged total where the run has one, else the median over parameters per step
    per = _per_tag(by_topic.get("update/ratio", []))
    series = per.pop("", None)
    if series is None:
        steps: dict[int, list[float]] = {}
        for s in per.values():
            for step, v in s:
                if math.isfinite(v):
                    steps.setdefault(step, []).append(v)
        series = [(step, _median(vs)) for step, vs in sorted(steps.items())]
    half = [(s, v) for s, v in series[len(series) // 2:] if math.isfinite(v)]
    if len(series) < MIN_RATIO_SAMPLES or not half:
        return []  # a run too short for a trend (Adam's first step moves by lr per weight)
    med = _median([v for _, v in half])
    lo, hi = UPDATE_RATIO
    if lo <= med <= hi:
        return []
    what = "weights barely move (lr too low?)" if med < lo else "large steps (lr too high?)"
    return [Verdict("update/ratio", "", f"update/ratio: median {med:.2e} over steps "
                    f"{half[0][0]}-{half[-1][0]}, outside [{lo:g}, {hi:g}] around 1e-3: "
                    f"{what}")]


def _threshold(by_topic: Mapping[str, list[dict]], topic: str, bad: Callable[[float], bool],
               key: Callable[[float], float], text: str, fmt: str = "{:.3g}") -> list[Verdict]:
    hits = _worst({p: sv for p, sv in _last(by_topic, topic).items() if p},
                  bad, key)
    if not hits:
        return []
    return [Verdict(topic, hits[0][0], f"{topic}: {_names(hits, fmt)} at the last sample; "
                    f"{text}")]


def _frozen_relevance(by_topic: Mapping[str, list[dict]]) -> list[Verdict]:
    rel = _per_tag(by_topic.get("blocks/relevance", []))
    rel.pop("", None)
    active = _per_tag(by_topic.get("blocks/active", [])).get("", [])
    if not rel or not active:
        return []
    order = list(rel)  # emission order: blocks front to back
    values = {p: dict(s) for p, s in rel.items()}
    out = []
    for b_idx, b in enumerate(order):
        since = v0 = None
        for step, act in active:
            frozen = b_idx < len(order) - int(act)
            v = values[b].get(step)
            if not frozen:
                since = v0 = None
            elif since is None and v is not None and v > 0:
                since, v0 = step, v
            elif since is not None and v is not None and v >= RELEVANCE_RISE * v0:
                out.append(Verdict("blocks/relevance", b,
                                   f"blocks/relevance: {safe_text(b, 60)} frozen since step "
                                   f"{since}, relevance rose x{v / v0:.2f} ({v0:.3g} -> "
                                   f"{v:.3g}) by step {step}: it may need to train again"))
                break
    return out


def check(by_topic: Mapping[str, list[dict]],
          max_condition: float = DEFAULT_MAX_CONDITION) -> list[Verdict]:
    """Every warning for one run's clean records (topic -> records)."""
    if not isinstance(by_topic, Mapping):
        raise TypeError(f"by_topic must map topics to record lists, got "
                        f"{type(by_topic).__name__}")
    if isinstance(max_condition, bool) or not isinstance(max_condition, int | float) \
            or not max_condition > 1 or not math.isfinite(max_condition):
        raise ValueError(f"max_condition must be a finite number > 1, got {max_condition!r}")
    out = _counters(by_topic) + _update_ratio(by_topic)
    out += _threshold(by_topic, "muon/ns_residual", lambda v: v > NS_RESIDUAL_MAX, lambda v: -v,
                      f"healthy <= {NS_RESIDUAL_MAX:g} (NS output not near-orthogonal: more "
                      f"ns_steps, or a near-zero gradient)")
    bound = COND_SHARE * max_condition
    for t in ("kfac/cond_A", "kfac/cond_G"):
        out += _threshold(by_topic, t, lambda v: v >= bound, lambda v: -v,
                          f"near max_condition {max_condition:.3g}: clipping shapes the "
                          f"preconditioner (raise damping?)", "{:.3g}")
    for t in ("kfac/clipped_A", "kfac/clipped_G"):
        out += _threshold(by_topic, t, lambda v: v > 0, lambda v: -v,
                          "eigenvalues raised to the max_condition floor (factor "
                          "rank-deficient: more rows per factor update?)", "{:.0f}")
    out += _threshold(by_topic, "falcon/mask_sparsity", lambda v: v > MASK_SPARSITY_MAX,
                      lambda v: -v, f"healthy <= {MASK_SPARSITY_MAX:g} (most frequency bins "
                      f"zeroed: raise retain_energy?)")
    out += _threshold(by_topic, "falcon/cos_raw_filtered", lambda v: v < COS_FILTERED_MIN,
                      lambda v: v, f"healthy >= {COS_FILTERED_MIN:g} (the filtered gradient "
                      f"points away from the raw one)")
    out += _frozen_relevance(by_topic)
    return out


def markdown_table() -> str:
    """``RANGES`` as the Markdown table docs/dashboards.md shows."""
    lines = ["| topic | healthy | outside it | source |", "|---|---|---|---|"]
    lines += [f"| `{r.topic}` | {r.healthy} | {r.why} | {r.source} |" for r in RANGES]
    return "\n".join(lines)
