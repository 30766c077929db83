"""PNG figures for ``probe report --plots``: quality vs wall-clock time, time to a target,
stage time breakdown and each optimizer family's key diagnostics, runs side by side.

Every y-axis carries its unit from the catalogue (hooks/topics.py); a panel whose values span
more than two decades is drawn on a log scale; text from the files (run and stage names) is
drawn literally (dollars escaped), never parsed as mathtext.
"""

from __future__ import annotations

import math
import os

import numpy as np

from hooks import topics
from probe.records import safe_text
from probe.report import KEY_DIAGNOSTICS, TOP_STAGES, Run, stage_costs, time_to_target

DECADES_FOR_LOG = 2.0


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _label(s: str, limit: int = 40) -> str:
    # an escaped dollar is drawn as itself: a name like "$\\frac{$" is not mathtext
    return safe_text(s, limit).replace("$", r"\$")


def unit_label(topic: str) -> str:
    """The y-axis label of ``topic``: its catalogue unit (the topic itself when undeclared)."""
    row = topics.lookup(topic)
    return row.unit if row is not None else topic


def wants_log(values: list[np.ndarray]) -> bool:
    """True when the finite values are all positive and span more than two decades."""
    fin = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.empty(0)
    if fin.size < 2 or fin.min() <= 0:
        return False
    return math.log10(fin.max() / fin.min()) > DECADES_FOR_LOG


def _smooth(v: np.ndarray, n: int) -> np.ndarray:
    # a trailing mean: train loss per step is noisy, its trend is what a reader compares
    if v.size < 2 * n or n < 2:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = np.empty_like(v)
    out[n - 1:] = (c[n:] - c[:-n]) / n
    out[:n - 1] = c[1:n] / np.arange(1, n)
    return out


def _quality(plt, runs: list[Run], path: str) -> bool:
    panels = [t for t in ("train/loss", "eval/loss", "eval/accuracy")
              if any(t in r.by_topic for r in runs)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, topic in zip(axes[0], panels):
        drawn = []
        for i, r in enumerate(runs):
            _, walls, vals = r.series(topic)
            if not vals.size:
                continue
            if topic == "train/loss":
                vals = _smooth(vals, max(1, vals.size // 30))
            drawn.append(vals)
            ax.plot(walls, vals, color=f"C{i % 10}", label=_label(r.label),
                    marker="o" if vals.size < 40 else None, ms=3)
        if topic != "eval/accuracy" and wants_log(drawn):
            ax.set_yscale("log")
        ax.set_xlabel("wall-clock time (s)")
        ax.set_ylabel(f"{topic.split('/')[-1]} ({unit_label(topic)})")
        ax.set_title(topic + (" (trailing mean)" if topic == "train/loss" else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _target(plt, runs: list[Run], topic: str | None, target: float | None, path: str) -> bool:
    if topic is None or target is None:
        return False
    secs = [time_to_target(r, topic, target) for r in runs]
    fig, ax = plt.subplots(figsize=(1.6 * len(runs) + 3, 3.8))
    x = np.arange(len(runs))
    heights = [0.0 if math.isnan(s) else s for s in secs]
    bars = ax.bar(x, heights, color=[f"C{i % 10}" for i in range(len(runs))])
    for b, s in zip(bars, secs):
        label = "not reached" if math.isnan(s) else f"{s:.2f} s"
        ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [_label(r.label, 24) for r in runs], rotation=15, fontsize=8)
    ax.set_ylabel("wall-clock time (s)")
    ax.set_title(f"time to {topic} {target:.4g}")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def stage_table(runs: list[Run]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(segment names, amortized ms per step [segment, run], share of step [segment, run]):
    the ``TOP_STAGES`` costliest stages over all runs, then 'other stages', then 'rest of
    step' (step time no span covers)."""
    costs = [stage_costs(r) for r in runs]
    total: dict[str, float] = {}
    for cs, _, _ in costs:
        for c in cs:
            total[c.name] = total.get(c.name, 0.0) + c.per_step_ms
    top = sorted(total, key=lambda n: (-total[n], n))[:TOP_STAGES]
    index = {n: i for i, n in enumerate(top)}
    names = top + ["other stages", "rest of step"]
    ms = np.zeros((len(names), len(runs)))
    share = np.zeros((len(names), len(runs)))
    for j, (cs, _, mean_step) in enumerate(costs):
        for c in cs:
            i = index.get(c.name, len(top))
            ms[i, j] += c.per_step_ms
            share[i, j] += c.share if math.isfinite(c.share) else 0.0
        if math.isfinite(mean_step) and mean_step > 0:
            covered = ms[:-1, j].sum()
            ms[-1, j] = max(0.0, mean_step - covered)
            share[-1, j] = max(0.0, 1.0 - covered / mean_step)
    return names, ms, share


def _stage_colours(names: list[str]) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    # every named stage its own colour (tab20 has 20), the two summary segments in greys
    # the ten dark shades first, then the light ones: neighbours never share a hue
    return [cmap((2 * i) % 20 + (i // 10) % 2) for i in range(len(names) - 2)] + ["0.55", "0.85"]


def _stage_breakdown(plt, runs: list[Run], path: str) -> bool:
    names, ms, share = stage_table(runs)
    keep = [i for i in range(len(names)) if ms[i].any()]
    if not keep or all(names[i] == "rest of step" for i in keep):
        return False
    colours = _stage_colours(names)
    fig, axes = plt.subplots(1, 2, figsize=(1.3 * len(runs) + 7, 4.4))
    x = np.arange(len(runs))
    for ax, data, ylabel, title in (
            (axes[0], ms, "ms per step (amortized)", "stage cost per step"),
            (axes[1], 100 * share, "% of step time", "share of the step")):
        bottom = np.zeros(len(runs))
        for i in keep:
            ax.bar(x, data[i], bottom=bottom, color=colours[i],
                   label=_label(names[i]) if ax is axes[0] else None)
            bottom += data[i]
        ax.set_xticks(x, [_label(r.label, 24) for r in runs], rotation=15, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(fontsize=7, loc="center left", bbox_to_anchor=(0.80, 0.5))
    fig.suptitle("step time breakdown: each stage's total time / timed steps", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.80, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _diagnostics(plt, runs: list[Run], family: str, path: str) -> bool:
    topics_ = [t for t in KEY_DIAGNOSTICS[family] if any(r.values(t).size for r in runs)]
    if not topics_:
        return False
    cols = min(3, len(topics_))
    rows = math.ceil(len(topics_) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, topic in zip(axes.flat, topics_):
        drawn = []
        for i, r in enumerate(runs):
            # the line is the median over tags so that it sits inside its band
            steps, _, vals = r.series(topic, total=False)
            if not vals.size:
                continue
            drawn.append(vals)
            ax.plot(steps, vals, color=f"C{i % 10}", label=_label(r.label),
                    marker="o" if vals.size < 3 else None)
            bs, lo, hi = r.band(topic)
            if bs.size:
                drawn += [lo, hi]
                ax.fill_between(bs, lo, hi, color=f"C{i % 10}", alpha=0.15)
        log = wants_log(drawn)
        if log:
            ax.set_yscale("log")
        ax.set_title(topic + (" (log scale)" if log else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(unit_label(topic))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(topics_):]:
        ax.set_visible(False)
    fig.suptitle(f"{family}: median over tags, band = min..max over tags", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_plots(runs: list[Run], outdir: str, topic: str | None,
                target: float | None) -> list[str]:
    """Write every figure the runs have data for into ``outdir``; the paths written. File
    names are fixed (nothing from the runs goes into a path)."""
    if not isinstance(outdir, (str, os.PathLike)):
        raise ValueError(f"outdir must be a folder path, got {outdir!r}")
    os.makedirs(outdir, exist_ok=True)
    plt = _plt()
    written = []
    jobs = [("quality_vs_time.png", lambda p: _quality(plt, runs, p)),
            ("time_to_target.png", lambda p: _target(plt, runs, topic, target, p)),
            ("stage_times.png", lambda p: _stage_breakdown(plt, runs, p))]
    jobs += [(f"diagnostics_{fam}.png",
              lambda p, fam=fam: _diagnostics(plt, runs, fam, p)) for fam in KEY_DIAGNOSTICS]
    for name, job in jobs:
        path = os.path.join(outdir, name)
        if job(path):
            written.append(path)
    return written
