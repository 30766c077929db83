"""TensorBoard custom-scalar layouts built from the scalar tags a run actually wrote.

A layout is what ``SummaryWriter.add_custom_scalars`` takes: ``{category: {chart title:
["Multiline", [tag regex, ...]] or ["Margin", [value, lower, upper]]}}``. A category and a
chart appear only when at least one of their tags was written, so an AdamW run shows no
Muon panel and a Muon run shows exactly the Muon charts it fed.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping

# (category, chart title, topic patterns): one Multiline chart over every tag of the topics.
# Each optimizer's own diagnostics come first (the reason to use optprobe), then the generic
# panels; the order here is the order TensorBoard shows the categories in. A stage-time
# chart is named after its optimizer: TensorBoard merges same-named categories of several
# runs, and four charts all titled "stage times" could not be told apart.
MULTILINE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Muon", "Muon stage times (ms)", ("time/muon/*",)),
    ("Muon", "NS residual ||I - XX^T||_F / sqrt(m)", ("muon/ns_residual",)),
    ("Muon", "NS iterations", ("muon/ns_iters",)),
    ("Muon", "update RMS", ("muon/update_rms",)),
    ("FALCON", "FALCON stage times (ms)", ("time/falcon/*",)),
    ("FALCON", "mask sparsity", ("falcon/mask_sparsity",)),
    ("FALCON", "retained energy", ("falcon/retained_energy",)),
    ("FALCON", "cos(raw, filtered)", ("falcon/cos_raw_filtered",)),
    ("FALCON", "low-rank residual", ("falcon/lowrank_residual",)),
    ("FALCON", "mask recomputed", ("falcon/mask_recomputed",)),
    ("FALCON", "schedule", ("falcon/filtered_fraction", "falcon/retain_target",
                            "falcon/skip_mix")),
    ("K-FAC", "K-FAC stage times (ms)", ("time/kfac/*",)),
    ("K-FAC", "condition numbers, log10", ("kfac/cond_A_log10", "kfac/cond_G_log10")),
    ("K-FAC", "clipped eigenvalues", ("kfac/clipped_A", "kfac/clipped_G")),
    ("K-FAC", "Cholesky jitter", ("kfac/jitter",)),
    ("K-FAC", "tokens behind G", ("kfac/tokens",)),
    ("Blocks", "Blocks stage times (ms)", ("time/blocks/*",)),
    ("Blocks", "relevance", ("blocks/relevance",)),
    ("Blocks", "active set", ("blocks/active",)),
    ("Step", "step time (ms)", ("step/time_ms",)),
    ("Step", "stage times (ms)", ("time/*",)),  # the stages no optimizer panel took
    ("Step", "probe overhead (ms)", ("probe/overhead_ms",)),
    ("Training", "loss", ("train/loss", "eval/loss")),
    ("Training", "accuracy", ("eval/accuracy",)),
    ("Updates", "gradient norm", ("grad/norm",)),
    ("Updates", "parameter norm", ("param/norm",)),
    ("Updates", "update norm", ("update/norm",)),
    ("Updates", "update / parameter, log10", ("update/ratio_log10",)),
    ("Updates", "cos(-update, grad)", ("update/cos_grad",)),
    ("System", "GPU utilization (%)", ("gpu/utilization",)),
    ("System", "GPU memory (bytes)", ("gpu/memory_used", "cuda/memory_allocated",
                                      "cuda/max_memory_allocated")),
    ("System", "GPU power (W)", ("gpu/power",)),
    ("System", "GPU temperature (C)", ("gpu/temperature",)),
    ("System", "SM clock (MHz)", ("gpu/sm_clock",)),
    ("Health", "non-finite gradients", ("anomaly/nonfinite",)),
    ("Health", "skipped steps", ("anomaly/skipped_step",)),
    ("Health", "dropped events", ("probe/dropped_events",)),
    ("Health", "collector errors", ("probe/collector_errors",)),
    ("Health", "diagnostic errors", ("probe/diagnostic_errors",)),
)

# Quantities that span decades across layers (a condition number of 10 next to one of 1e8):
# the TensorBoard collector also writes log10 of each value under ``<topic>_log10``, and the
# layout charts that, since Custom Scalars has no log axis.
LOG10_TOPICS = frozenset({"kfac/cond_A", "kfac/cond_G", "update/ratio"})

# charts whose topic has a model-wide total (the tag ``<topic>``) and per-tensor tags
# (``<topic>/<param>``): the total gets a chart of its own, before the per-tensor one
SPLIT_TOTALS = ("Updates",)

# (category, chart title prefix, value topic, lower topic, upper topic): one Margin chart per
# ``param`` that has all three. The singular-value band has no centre line of its own, so
# the largest singular value is drawn as the line and the band spans [sv_min, sv_max].
MARGIN: tuple[tuple[str, str, str, str, str], ...] = (
    ("Muon", "singular values", "muon/sv_max", "muon/sv_min", "muon/sv_max"),
)

USER = "User"


def _exact(tag: str) -> str:
    # Multiline entries are regexes: anchor each written tag so no other tag sneaks in
    return f"^{re.escape(tag)}$"


def _matching(tags: Mapping[str, Iterable[str]], patterns: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for topic in sorted(tags):
        if any(fnmatch.fnmatchcase(topic, p) for p in patterns):
            out.extend(sorted(tags[topic]))
    return out


def build_layout(tags: Mapping[str, Iterable[str]]) -> dict[str, dict[str, list]]:
    """The custom-scalar layout for ``tags``: topic -> the scalar tags written for it."""
    if not isinstance(tags, Mapping):
        raise ValueError(f"tags must be a mapping of topic to written tags, got "
                         f"{type(tags).__name__}")
    tags = {t: set(v) for t, v in tags.items() if v}
    layout: dict[str, dict[str, list]] = {}
    taken: set[str] = set()  # each tag on one chart: the first one that claims it
    for category, title, patterns in MULTILINE:
        found = [t for t in _matching(tags, patterns) if t not in taken]
        if not found:
            continue
        taken.update(found)
        charts = layout.setdefault(category, {})
        totals = [t for t in found if t in patterns]
        if category in SPLIT_TOTALS and totals and len(totals) < len(found):
            charts[f"{title} (total)"] = ["Multiline", [_exact(t) for t in totals]]
            charts[f"{title} per tensor"] = ["Multiline", [_exact(t) for t in found
                                                           if t not in totals]]
        else:
            charts[title] = ["Multiline", [_exact(t) for t in found]]
    for category, title, value, lower, upper in MARGIN:
        for v_tag in sorted(tags.get(value, ())):
            suffix = v_tag[len(value):]  # "" or "/<param>"
            lo, hi = lower + suffix, upper + suffix
            if lo in tags.get(lower, ()) and hi in tags.get(upper, ()):
                name = f"{title} {suffix[1:]}".strip()
                layout.setdefault(category, {})[name] = ["Margin", [v_tag, lo, hi]]
    for topic in sorted(t for t in tags if t.startswith("user/")):
        layout.setdefault(USER, {})[topic[len("user/"):]] = [
            "Multiline", [_exact(t) for t in sorted(tags[topic])]]
    return {c: layout[c] for c in categories() if c in layout}


def categories() -> tuple[str, ...]:
    """Every category a layout can hold, in display order."""
    seen = dict.fromkeys(c for c, *_ in MULTILINE)
    seen.update(dict.fromkeys(c for c, *_ in MARGIN))
    seen[USER] = None
    return tuple(seen)
