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

from hooks import topics
from probe import verdicts
from probe.records import read_file, safe_text

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
# the report and figures name this many costliest stages; the rest are summed into one row
TOP_STAGES = 12


@dataclass
class Run:
    """One run's good records, grouped by topic, and the lines that could not be used."""

    name: str
    path: str
    records: list[dict]
    bad: list[tuple[int, str]]
    skipped: dict[str, int] = field(default_factory=dict)
    label: str = ""
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
        self.label = self.label or self.name

    @property
    def n_bad(self) -> int:
        """Unreadable lines plus parsed records that could not be used."""
        return len(self.bad) + sum(self.skipped.values())

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
            (slot[1] if r["tags"].get("param") else slot[0]).append(float(v))
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
            if r["tags"].get("param") and isinstance(v, (int, float)):
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


def short_labels(names: list[str]) -> list[str]:
    """``names`` without the prefix and suffix they all share (cut at a '-', '_' or '.'), so
    stamped run names ``20261202-1030-adamw``, ``20261202-1030-muon`` read ``adamw``, ``muon``;
    a name left empty, or labels that would collide, keep the full names."""
    if len(names) < 2:
        return list(names)

    def common(strs: list[str]) -> int:
        n = len(os.path.commonprefix(strs))
        cut = max((strs[0].rfind(c, 0, n) for c in "-_."), default=-1)
        # a whole shared name up to a separator is a prefix; else cut at the last separator
        return n if n and all(len(x) > n and x[n - 1] in "-_." for x in strs) else cut + 1

    head = common(names)
    rev = [x[head:][::-1] for x in names]
    tail = common(rev)
    out = [x[head:len(x) - tail] if tail else x[head:] for x in names]
    if any(not x for x in out) or len(set(out)) < len(out):
        return list(names)
    return out


def load_runs(paths: list[str]) -> list[Run]:
    """Read every run behind ``paths``; names are the run folders' names, made unique, and
    labels those names without the stamp they share."""
    runs: list[Run] = []
    names: dict[str, int] = {}
    for f in find_runs(paths):
        try:
            good, bad, skipped = read_file(f)
        except OSError as exc:
            raise ValueError(f"RUN_DIR {safe_text(f)!r} cannot be read: {exc.strerror}") from None
        folder = os.path.dirname(os.path.abspath(f))
        name = safe_text(os.path.basename(folder) or f, 80)
        n = names.get(name, 0)
        names[name] = n + 1
        runs.append(Run(name if n == 0 else f"{name}#{n + 1}", f, good, bad, skipped))
    for r, label in zip(runs, short_labels([r.name for r in runs])):
        r.label = label
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


@dataclass(frozen=True)
class StageCost:
    """One stage's cost over the run's timed steps: ``per_step_ms`` is amortized (its total
    time / the number of timed steps) and ``share`` that total over the steps' total time, so
    shares and amortized costs add up over the stages and the rest of the step."""

    name: str
    per_step_ms: float
    share: float
    ran: int  # timed steps on which it ran
    mean_ms: float  # mean ms on the steps where it ran (all its tags summed)


def stage_costs(run: Run) -> tuple[list[StageCost], int, float]:
    """(stage costs, costliest first; the number of timed steps; their mean step ms). A timed
    step has an untagged step/time_ms; without any, the steps with a stage are counted and
    the shares are NaN."""
    step_ms: dict[int, float] = {}
    for r in run.by_topic.get("step/time_ms", ()):
        v = r["value"]
        if not r["tags"] and isinstance(v, float) and math.isfinite(v):
            step_ms[r["step"]] = v
    per_stage: dict[str, dict[int, float]] = {}
    for topic, recs in run.by_topic.items():
        if not topic.startswith("time/"):
            continue
        per = per_stage.setdefault(topic[len("time/"):], {})
        for r in recs:
            v = r["value"]
            if isinstance(v, float) and math.isfinite(v) and (not step_ms or r["step"] in step_ms):
                per[r["step"]] = per.get(r["step"], 0.0) + v
    steps = set(step_ms) or {s for per in per_stage.values() for s in per}
    n = len(steps)
    total_step = float(sum(step_ms.values()))
    out = []
    for name, per in per_stage.items():
        if not per:
            continue
        total = float(sum(per.values()))
        out.append(StageCost(name, total / n, total / total_step if total_step > 0 else math.nan,
                             len(per), total / len(per)))
    out.sort(key=lambda c: (-c.per_step_ms, c.name))
    return out, n, total_step / len(step_ms) if step_ms else math.nan


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
        w = [x["wall_time"] or 0.0 for x in r.records]
        walls.append(max(w) - r.t0 if w and r.t0 else math.nan)
    rows += [("step ms median", meds), ("step ms p95", p95s), ("wall s (events)", walls)]
    if topic is not None and target is not None:
        secs = [time_to_target(r, topic, target) for r in runs]
        rows.append((f"s to {topic} {target:.4g}",
                     [s if math.isfinite(s) else "never" for s in secs]))
    rows.append(("events / bad lines", [f"{len(r.records)}/{r.n_bad}" for r in runs]))
    return rows


def _unit(topic: str) -> str:
    row = topics.lookup(topic)
    return row.unit if row is not None else ""


def _stage_lines(r: Run) -> list[str]:
    costs, n, mean_step = stage_costs(r)
    if not costs:
        return []
    lines = [f"   {'stage (amortized over ' + str(n) + ' timed steps)':<40} {'ms/step':>11} "
             f"{'of step':>8} {'ran on':>7} {'ms when ran':>11}"]
    for c in costs[:TOP_STAGES]:
        share = f"{100 * c.share:7.1f}%" if math.isfinite(c.share) else f"{'-':>8}"
        lines.append(f"   {safe_text(c.name, 40):<40} {_fmt(c.per_step_ms)} {share} "
                     f"{c.ran:>7d} {_fmt(c.mean_ms)}")
    rest = costs[TOP_STAGES:]
    if rest:
        ms = sum(c.per_step_ms for c in rest)
        sh = sum(c.share for c in rest)
        share = f"{100 * sh:7.1f}%" if math.isfinite(sh) else f"{'-':>8}"
        lines.append(f"   {f'({len(rest)} more stages)':<40} {_fmt(ms)} {share}")
    if math.isfinite(mean_step):
        covered = sum(c.per_step_ms for c in costs)
        lines.append(f"   {'rest of step (no span)':<40} {_fmt(max(0.0, mean_step - covered))} "
                     f"{100 * max(0.0, 1 - covered / mean_step):7.1f}%")
        lines.append(f"   {'whole step (mean)':<40} {_fmt(mean_step)} {100.0:7.1f}%")
    return lines


def _diagnostic_lines(r: Run) -> list[str]:
    diag = [(t, r.values(t), r.series(t)[2]) for fam in KEY_DIAGNOSTICS.values()
            for t in fam if t in r.by_topic]
    diag = [(t, allv, ser) for t, allv, ser in diag if allv.size and ser.size]
    if not diag:
        return []
    lines = [f"   {'diagnostic':<32} {'unit':>8} {'last':>11} {'min':>11} {'max':>11} "
             f"{'tags':>5}"]
    for t, allv, ser in diag:
        ntags = len({x["tags"].get("param", "") for x in r.by_topic[t]})
        fin = allv[np.isfinite(allv)]
        mn, mx = (float(fin.min()), float(fin.max())) if fin.size else (math.nan,) * 2
        lines.append(f"   {t:<32} {_unit(t):>8} {_fmt(float(ser[-1]))} {_fmt(mn)} {_fmt(mx)} "
                     f"{ntags:>5}")
    return lines


def render(runs: list[Run], topic: str | None = None, target: float | None = None,
           max_condition: float = verdicts.DEFAULT_MAX_CONDITION) -> str:
    """The whole text report: the side-by-side table, then one block per run with its stage
    costs, key diagnostics and the warnings of ``probe.verdicts``."""
    width = max(11, *(len(r.label) for r in runs))
    lines = []
    head = f"{'':<26}" + "".join(f" {r.label:>{width}}" for r in runs)
    lines += [head, "-" * len(head)]
    for label, vals in comparison_rows(runs, topic, target):
        cells = "".join(f" {v:>{width}}" if isinstance(v, str) else " " + _fmt(v, width)
                        for v in vals)
        lines.append(f"{label:<26}{cells}")
    for r in runs:
        lines += ["", f"== {r.label}  ({safe_text(r.path, 300)})"]
        if r.bad:
            shown = "; ".join(f"line {n}: {safe_text(why, 80)}" for n, why in r.bad[:5])
            more = f" (+{len(r.bad) - 5} more)" if len(r.bad) > 5 else ""
            lines.append(f"   {len(r.bad)} bad line(s) skipped: {shown}{more}")
        if r.skipped:
            why = "; ".join(f"{k} ({v})" for k, v in sorted(r.skipped.items()))
            lines.append(f"   {sum(r.skipped.values())} record(s) skipped: {why}")
        lines += _stage_lines(r)
        lines += _diagnostic_lines(r)
        if not r.records:
            lines.append("   no usable events")
        found = verdicts.check(r.by_topic, max_condition)
        lines += [f"   warning: {v.message}" for v in found]
        if r.records and not found:
            lines.append("   no warnings: every checked quantity is in its healthy range "
                         "(docs/dashboards.md)")
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
    ap.add_argument("--max-condition", type=float, default=verdicts.DEFAULT_MAX_CONDITION,
                    help="K-FAC's max_condition, for the conditioning warnings (1e6)")


def check_plots_dir(path: str) -> None:
    """Create ``path`` if needed; ValueError when it is not a writable folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--plots {safe_text(path)!r} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--plots {safe_text(path)!r} cannot be created: {exc.strerror}") \
            from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--plots {safe_text(path)!r} is not writable")


def run(args: argparse.Namespace) -> int:
    """Print the report; write figures with ``--plots``. Exit status 1 with a one-line
    message for a bad argument, no usable run, or an explicit --target no run reaches."""
    def fail(msg: str) -> SystemExit:
        return SystemExit(f"probe report: {msg}")

    target = args.target
    if target is not None and not math.isfinite(target):
        raise fail(f"--target must be a finite number, got {target}")
    mc = args.max_condition
    if not (math.isfinite(mc) and mc > 1):
        raise fail(f"--max-condition must be a finite number > 1, got {mc}")
    try:
        if args.plots:
            check_plots_dir(args.plots)
        runs = load_runs(args.runs)
    except ValueError as exc:
        raise fail(str(exc)) from None
    for r in runs:
        if r.n_bad:
            first = f"line {r.bad[0][0]} ({safe_text(r.bad[0][1], 80)})" if r.bad else \
                f"records: {safe_text(next(iter(r.skipped)), 80)}"
            print(f"probe report: {safe_text(r.path)}: {r.n_bad} bad line(s)/record(s) "
                  f"skipped, first: {first}", file=sys.stderr)
    empty = [r for r in runs if not r.records]
    runs = [r for r in runs if r.records]
    for r in empty:
        print(f"probe report: {safe_text(r.path)} has no usable events, left out (not a run's "
              f"events.jsonl?)", file=sys.stderr)
    if not runs:
        raise fail("no usable events in " + ", ".join(safe_text(r.path) for r in empty))
    topic = args.target_topic or target_topic(runs)
    if topic is not None and not any(topic in r.by_topic for r in runs):
        raise fail(f"--target-topic {safe_text(topic)!r} is in none of the runs")
    if target is None and topic is not None:
        target = default_target(runs, topic)
    print(render(runs, topic, target, mc))
    status = 0
    if args.target is not None and topic is not None and not any(
            math.isfinite(time_to_target(r, topic, target)) for r in runs):
        print(f"probe report: no run reaches --target {target:g} on {topic}", file=sys.stderr)
        status = 1
    if args.plots:
        from probe.report_plots import write_plots

        try:
            files = write_plots(runs, args.plots, topic, target)
        except OSError as exc:
            raise fail(f"--plots {safe_text(args.plots)!r}: {exc.strerror or exc}") from None
        print()
        print(f"Figures written to {safe_text(args.plots)}:")
        for f in files:
            print(f"  {safe_text(f)}")
    return status
