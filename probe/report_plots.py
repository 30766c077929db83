"""PNG figures for ``probe report --plots``: quality vs wall-clock time, time to a target,
stage time breakdown and each optimizer family's key diagnostics, runs side by side."""

from __future__ import annotations

import math
import os

import numpy as np

from probe.report import KEY_DIAGNOSTICS, Run, stage_medians, step_times, time_to_target


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


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
        for r in runs:
            _, walls, vals = r.series(topic)
            if not vals.size:
                continue
            if topic == "train/loss":
                vals = _smooth(vals, max(1, vals.size // 30))
            ax.plot(walls, vals, label=r.name, marker="o" if vals.size < 40 else None, ms=3)
        ax.set_xlabel("wall-clock time (s)")
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
    bars = ax.bar(x, heights, color=[f"C{i}" for i in range(len(runs))])
    for b, s in zip(bars, secs):
        label = "not reached" if math.isnan(s) else f"{s:.2f} s"
        ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [r.name for r in runs], rotation=15, fontsize=8)
    ax.set_ylabel("wall-clock seconds")
    ax.set_title(f"time to {topic} {target:.4g}")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _stage_breakdown(plt, runs: list[Run], path: str) -> bool:
    per_run = [dict(stage_medians(r)) for r in runs]
    steps = [step_times(r) for r in runs]
    if not any(per_run) and not any(s.size for s in steps):
        return False
    names = sorted({n for d in per_run for n in d})
    fig, ax = plt.subplots(figsize=(1.6 * len(runs) + 4, 4))
    x = np.arange(len(runs))
    bottom = np.zeros(len(runs))
    for i, n in enumerate(names):
        h = np.asarray([d.get(n, 0.0) for d in per_run])
        ax.bar(x, h, bottom=bottom, label=n, color=f"C{i % 10}")
        bottom += h
    # what the spans do not cover: the step's median minus the stages (never below zero)
    med = np.asarray([float(np.median(s)) if s.size else 0.0 for s in steps])
    other = np.clip(med - bottom, 0.0, None)
    ax.bar(x, other, bottom=bottom, label="rest of step", color="0.8")
    ax.set_xticks(x, [r.name for r in runs], rotation=15, fontsize=8)
    ax.set_ylabel("median ms per step")
    ax.set_title("step time breakdown")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _diagnostics(plt, runs: list[Run], family: str, path: str) -> bool:
    topics = [t for t in KEY_DIAGNOSTICS[family] if any(r.values(t).size for r in runs)]
    if not topics:
        return False
    cols = min(3, len(topics))
    rows = math.ceil(len(topics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, topic in zip(axes.flat, topics):
        for i, r in enumerate(runs):
            # the line is the median over tags so that it sits inside its band
            steps, _, vals = r.series(topic, total=False)
            if not vals.size:
                continue
            ax.plot(steps, vals, color=f"C{i}", label=r.name,
                    marker="o" if vals.size < 3 else None)
            bs, lo, hi = r.band(topic)
            if bs.size:
                ax.fill_between(bs, lo, hi, color=f"C{i}", alpha=0.15)
        ax.set_title(topic, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(topics):]:
        ax.set_visible(False)
    fig.suptitle(f"{family}: median over tags, band = min..max over tags", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_plots(runs: list[Run], outdir: str, topic: str | None,
                target: float | None) -> list[str]:
    """Write every figure the runs have data for into ``outdir``; the paths written."""
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
