"""``probe report RUN_DIR [RUN_DIR ...]``: tables (and PNG figures) from events.jsonl files.

Needs no TensorBoard: it reads the JSON lines each run wrote, reports bad lines and uses the
rest. Several runs are compared side by side (AdamW vs Muon vs FALCON, ...).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from dashboards import read_events

# the diagnostics a reader looks at first, by family (a family's figure holds its topics)
KEY_DIAGNOSTICS: dict[str, tuple[str, ...]] = {
    "updates": ("grad/norm", "update/ratio", "update/cos_grad"),
    "muon": ("muon/ns_residual", "muon/ns_iters", "muon/sv_min", "muon/sv_max",
             "muon/update_rms"),
    "falcon": ("falcon/mask_sparsity", "falcon/retained_energy", "falcon/cos_raw_filtered",
               "falcon/lowrank_residual", "falcon/filtered_fraction"),
    "kfac": ("kfac/cond_A", "kfac/cond_G", "kfac/clipped_A", "kfac/clipped_G", "kfac/jitter"),
    "blocks": ("blocks/relevance", "blocks/active"),
    "health": ("anomaly/nonfinite", "anomaly/skipped_step", "probe/dropped_events",
               "probe/collector_errors"),
}
HIGHER_IS_BETTER = ("accuracy",)


@dataclass
class Run:
    """One run's good records, grouped by topic, and the lines that could not be used."""

    name: str
    path: str
    records: list[dict]
    bad: list[tuple[int, str]]
    by_topic: dict[str, list[dict]] = field(default_factory=dict)
    t0: float = 0.0

    def __post_init__(self) -> None:
        by: dict[str, list[dict]] = defaultdict(list)
        walls = []
        for r in self.records:
            by[r["topic"]].append(r)
            w = r.get("wall_time")
            if isinstance(w, (int, float)) and w > 0:
                walls.append(w)
        self.by_topic = dict(by)
        self.t0 = min(walls) if walls else 0.0

    def series(self, topic: str, how: str = "median",
               total: bool = True) -> tuple[np.ndarray, ...]:
        """(steps, seconds since the run's first event, values) of ``topic``, one point per
        step: the untagged total where there is one (and ``total``), else the ``how``
        ('median' or 'sum') over the step's tagged values."""
        per_step: dict[int, list] = {}
        for r in self.by_topic.get(topic, ()):
            v = r["value"]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            slot = per_step.setdefault(int(r["step"]), [[], [], 0.0])
            (slot[1] if r.get("tags", {}).get("param") else slot[0]).append(float(v))
            slot[2] = max(slot[2], float(r.get("wall_time") or 0.0))
        steps = sorted(per_step)
        vals = []
        for s in steps:
            untagged, tagged, _ = per_step[s]
            if untagged and (total or not tagged):
                vals.append(untagged[-1])
            else:
                fin = [x for x in tagged if math.isfinite(x)]
                # a NaN on one tag (0/0 ratio of a zero bias) must not hide the others
                agg = (np.sum(fin) if how == "sum" else np.median(fin)) if fin else math.nan
                vals.append(float(agg))
        walls = [per_step[s][2] - self.t0 if per_step[s][2] else math.nan for s in steps]
        return (np.asarray(steps, dtype=np.int64), np.asarray(walls, dtype=np.float64),
                np.asarray(vals, dtype=np.float64))

    def band(self, topic: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps, min, max) over the tagged values of each step (the spread over params)."""
        per: dict[int, list[float]] = defaultdict(list)
        for r in self.by_topic.get(topic, ()):
            v = r["value"]
            if r.get("tags", {}).get("param") and isinstance(v, (int, float)):
                per[int(r["step"])].append(float(v))
        steps = sorted(per)
        steps = [s for s in steps if any(math.isfinite(x) for x in per[s])]
        return (np.asarray(steps), np.asarray([np.nanmin(per[s]) for s in steps]),
                np.asarray([np.nanmax(per[s]) for s in steps]))

    def values(self, topic: str) -> np.ndarray:
        """Every numeric value of ``topic``, all tags, all steps."""
        return np.asarray([float(r["value"]) for r in self.by_topic.get(topic, ())
                           if isinstance(r["value"], (int, float))], dtype=np.float64)


def find_runs(paths: list[str]) -> list[str]:
    """The events.jsonl files behind ``paths``: a file, a run folder, or a folder of runs."""
    if not paths:
        raise ValueError("RUN_DIR: give at least one run folder or events.jsonl file")
    out: list[str] = []
    for p in paths:
        if os.path.isfile(p):
            out.append(p)
        elif os.path.isfile(os.path.join(p, "events.jsonl")):
            out.append(os.path.join(p, "events.jsonl"))
        elif os.path.isdir(p):
            subs = sorted(os.path.join(p, d, "events.jsonl") for d in os.listdir(p))
            subs = [s for s in subs if os.path.isfile(s)]
            if not subs:
                raise ValueError(f"RUN_DIR {p!r} holds no events.jsonl (nor do its sub-folders)")
            out.extend(subs)
        else:
            raise ValueError(f"RUN_DIR {p!r} does not exist")
    return out


def load_runs(paths: list[str]) -> list[Run]:
    """Read every run behind ``paths``; names are the run folders' names, made unique."""
    runs: list[Run] = []
    names: dict[str, int] = {}
    for f in find_runs(paths):
        good, bad = read_events(f)
        folder = os.path.dirname(os.path.abspath(f))
        name = os.path.basename(folder) or f
        n = names.get(name, 0)
        names[name] = n + 1
        runs.append(Run(name if n == 0 else f"{name}#{n + 1}", f, good, bad))
    return runs


def _fmt(v: float | None, width: int = 11) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'-':>{width}}"
    a = abs(v)
    if a != 0 and (a >= 1e5 or a < 1e-3):
        return f"{v:>{width}.3e}"
    return f"{v:>{width}.4g}"


def time_to_target(run: Run, topic: str, target: float) -> float:
    """Seconds from the run's first event until ``topic`` first reaches ``target`` (NaN if
    never): at or above for accuracies, at or below for losses."""
    _, walls, vals = run.series(topic)
    higher = any(h in topic for h in HIGHER_IS_BETTER)
    hit = vals >= target if higher else vals <= target
    idx = np.flatnonzero(hit)
    return float(walls[idx[0]]) if idx.size else math.nan


def default_target(runs: list[Run], topic: str) -> float | None:
    """A target every run with ``topic`` reaches: 95% of the worst best accuracy, or 105% of
    the worst best loss."""
    bests = []
    for r in runs:
        v = r.series(topic)[2]
        v = v[np.isfinite(v)]
        if v.size:
            bests.append(v.max() if any(h in topic for h in HIGHER_IS_BETTER) else v.min())
    if not bests:
        return None
    if any(h in topic for h in HIGHER_IS_BETTER):
        return float(0.95 * min(bests))
    return float(1.05 * max(bests))


def target_topic(runs: list[Run]) -> str | None:
    """The quality topic to compare on: eval accuracy, else eval loss, else train loss."""
    for t in ("eval/accuracy", "eval/loss", "train/loss"):
        if any(t in r.by_topic for r in runs):
            return t
    return None


def stage_medians(run: Run) -> list[tuple[str, float]]:
    """(stage, median ms per step summed over its tags) for every time/* topic of ``run``."""
    out = []
    for topic in sorted(t for t in run.by_topic if t.startswith("time/")):
        v = run.series(topic, how="sum")[2]
        v = v[np.isfinite(v)]
        if v.size:
            out.append((topic[len("time/"):], float(np.median(v))))
    return out


def step_times(run: Run) -> np.ndarray:
    """The finite step/time_ms values of ``run``."""
    v = run.series("step/time_ms")[2]
    return v[np.isfinite(v)]


def comparison_rows(runs: list[Run], topic: str | None, target: float | None) -> list[tuple]:
    """(label, value per run) rows of the side-by-side table."""
    rows: list[tuple] = []
    for t, label in (("eval/accuracy", "accuracy"), ("eval/loss", "eval loss"),
                     ("train/loss", "train loss")):
        if not any(t in r.by_topic for r in runs):
            continue
        finals, bests = [], []
        for r in runs:
            v = r.series(t)[2]
            fin = v[np.isfinite(v)]
            finals.append(float(v[-1]) if v.size else math.nan)
            best = (fin.max() if label == "accuracy" else fin.min()) if fin.size else math.nan
            bests.append(float(best))
        rows.append((f"final {label}", finals))
        rows.append((f"best {label}", bests))
    meds, p95s, walls = [], [], []
    for r in runs:
        st = step_times(r)
        meds.append(float(np.median(st)) if st.size else math.nan)
        p95s.append(float(np.percentile(st, 95)) if st.size else math.nan)
        w = [x.get("wall_time") or 0.0 for x in r.records]
        walls.append(max(w) - r.t0 if w and r.t0 else math.nan)
    rows += [("step ms median", meds), ("step ms p95", p95s), ("wall s (events)", walls)]
    if topic is not None and target is not None:
        rows.append((f"s to {topic} {target:.4g}", [time_to_target(r, topic, target)
                                                   for r in runs]))
    rows.append(("events / bad lines", [f"{len(r.records)}/{len(r.bad)}" for r in runs]))
    return rows


def render(runs: list[Run], topic: str | None = None, target: float | None = None) -> str:
    """The whole text report: the side-by-side table, then one block per run."""
    width = max(11, *(len(r.name) for r in runs))
    lines = []
    head = f"{'':<26}" + "".join(f" {r.name:>{width}}" for r in runs)
    lines += [head, "-" * len(head)]
    for label, vals in comparison_rows(runs, topic, target):
        cells = "".join(f" {v:>{width}}" if isinstance(v, str) else " " + _fmt(v, width)
                        for v in vals)
        lines.append(f"{label:<26}{cells}")
    for r in runs:
        lines += ["", f"== {r.name}  ({r.path})"]
        if r.bad:
            shown = "; ".join(f"line {n}: {why}" for n, why in r.bad[:5])
            more = f" (+{len(r.bad) - 5} more)" if len(r.bad) > 5 else ""
            lines.append(f"   {len(r.bad)} bad line(s) skipped: {shown}{more}")
        st = step_times(r)
        stages = stage_medians(r)
        if stages:
            # share of the step time summed over the sampled steps: a stage that runs only
            # now and then (an eigendecomposition every 100 steps) is weighed by how often
            step_total = float(np.nansum(st)) if st.size else math.nan
            lines.append(f"   {'stage':<32} {'median ms':>11} {'of step':>8}")
            for name, ms in stages:
                total = float(np.nansum(r.values("time/" + name)))
                share = f"{100 * total / step_total:7.1f}%" if step_total > 0 else f"{'-':>8}"
                lines.append(f"   {name:<32} {_fmt(ms)} {share}")
        diag = [(t, r.values(t), r.series(t)[2]) for fam in KEY_DIAGNOSTICS.values()
                for t in fam if t in r.by_topic]
        diag = [(t, allv, ser) for t, allv, ser in diag if allv.size]
        if diag:
            lines.append(f"   {'diagnostic':<32} {'last':>11} {'min':>11} {'max':>11} "
                         f"{'tags':>5}")
            for t, allv, ser in diag:
                ntags = len({x.get('tags', {}).get('param', '') for x in r.by_topic[t]})
                fin = allv[np.isfinite(allv)]
                mn, mx = (float(fin.min()), float(fin.max())) if fin.size else (math.nan,) * 2
                lines.append(f"   {t:<32} {_fmt(float(ser[-1]))} {_fmt(mn)} {_fmt(mx)} "
                             f"{ntags:>5}")
        if not r.records:
            lines.append("   no usable events")
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The ``probe report`` options."""
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR",
                    help="run folders (holding events.jsonl), events.jsonl files, or a folder "
                         "of runs")
    ap.add_argument("--plots", metavar="DIR", default=None, help="write PNG figures to DIR")
    ap.add_argument("--target", type=float, default=None,
                    help="quality target for 'time to target' (default: one every run reaches)")
    ap.add_argument("--target-topic", default=None,
                    help="topic the target applies to (default: eval/accuracy, else eval/loss,"
                         " else train/loss)")


def run(args: argparse.Namespace) -> int:
    """Print the report; write figures with ``--plots``."""
    try:
        runs = load_runs(args.runs)
    except ValueError as exc:
        raise SystemExit(f"probe report: {exc}") from None
    topic = args.target_topic or target_topic(runs)
    if topic is not None and not any(topic in r.by_topic for r in runs):
        raise SystemExit(f"probe report: --target-topic {topic!r} is in none of the runs")
    target = args.target
    if target is not None and not math.isfinite(target):
        raise SystemExit(f"probe report: --target must be a finite number, got {target}")
    if target is None and topic is not None:
        target = default_target(runs, topic)
    for r in runs:
        if r.bad:
            print(f"probe report: {r.path}: {len(r.bad)} bad line(s) skipped, first at line "
                  f"{r.bad[0][0]} ({r.bad[0][1]})", file=sys.stderr)
    print(render(runs, topic, target))
    if args.plots:
        from probe.report_plots import write_plots

        files = write_plots(runs, args.plots, topic, target)
        print()
        print(f"Figures written to {args.plots}:")
        for f in files:
            print(f"  {f}")
    return 0
