"""The telemetry catalogue: every topic any producer may emit, declared once.

A topic ending in ``/*`` declares a family (``time/*`` covers ``time/muon/newton_schulz``).
``delivery`` says when an event of the topic reaches collectors:

- ``sampled``: only on sampled steps (``every=N``), the usual case;
- ``always``: on every step it is emitted (values the user logs explicitly);
- ``alarm``: on sampled steps always, on unsampled steps only when the value is non-zero
  (anomaly counters: a NaN is never hidden by sampling, a clean step costs no event).
"""

from __future__ import annotations

from dataclasses import dataclass

SCALAR, HISTOGRAM, TEXT = "scalar", "histogram", "text"


@dataclass(frozen=True)
class Topic:
    """One row of the catalogue."""

    name: str
    kind: str
    unit: str
    doc: str
    per: str = ""  # what the ``param`` tag names when present: parameter, layer, block, device
    delivery: str = "sampled"


_ROWS: tuple[Topic, ...] = (
    # probe: the whole step and generic statistics
    Topic("step/time_ms", SCALAR, "ms", "wall time of the whole optimizer step"),
    Topic("grad/norm", SCALAR, "L2", "gradient norm, per parameter and total", "parameter"),
    Topic("param/norm", SCALAR, "L2", "parameter norm before the step, per parameter and total",
          "parameter"),
    Topic("update/norm", SCALAR, "L2", "norm of the applied update, per parameter and total",
          "parameter"),
    Topic("update/ratio", SCALAR, "ratio", "update norm / parameter norm", "parameter"),
    Topic("update/cos_grad", SCALAR, "cosine", "cosine of (-update, grad)", "parameter"),
    Topic("grad/hist", HISTOGRAM, "value", "sample of gradient values", "parameter"),
    Topic("update/hist", HISTOGRAM, "value", "sample of applied update values", "parameter"),
    Topic("anomaly/nonfinite", SCALAR, "count",
          "parameters with NaN/Inf in their gradient (total) or 1 for the named parameter",
          "parameter", delivery="alarm"),
    Topic("anomaly/skipped_step", SCALAR, "count", "steps skipped for a non-finite gradient",
          delivery="alarm"),
    Topic("time/*", SCALAR, "ms", "time of a span (a named stage of a step)"),
    # Falcon
    Topic("falcon/mask_sparsity", SCALAR, "fraction", "fraction of frequency bins zeroed",
          "parameter"),
    Topic("falcon/retained_energy", SCALAR, "fraction", "fraction of spectral energy kept",
          "parameter"),
    Topic("falcon/lowrank_residual", SCALAR, "fraction",
          "relative energy lost by the rank-k step", "parameter"),
    Topic("falcon/cos_raw_filtered", SCALAR, "cosine", "cosine(raw grad, filtered grad)",
          "parameter"),
    Topic("falcon/mask_recomputed", SCALAR, "count",
          "mask rebuilds (cache misses) since the last sampled step, this one included",
          "parameter"),
    Topic("falcon/svd_fallbacks", SCALAR, "count",
          "low-rank steps where svd failed and power iteration stood in (total)",
          delivery="alarm"),
    Topic("falcon/filtered_fraction", SCALAR, "fraction", "fraction of parameters filtered"),
    Topic("falcon/retain_target", SCALAR, "fraction", "scheduled retain_energy"),
    Topic("falcon/skip_mix", SCALAR, "fraction", "scheduled skip-mix lambda"),
    # Muon
    Topic("muon/ns_residual", SCALAR, "ratio", "||I - X X^T||_F / sqrt(m) after Newton-Schulz",
          "parameter"),
    Topic("muon/ns_iters", SCALAR, "count", "Newton-Schulz iterations run", "parameter"),
    Topic("muon/sv_min", SCALAR, "value", "smallest singular value of the NS output", "parameter"),
    Topic("muon/sv_max", SCALAR, "value", "largest singular value of the NS output", "parameter"),
    Topic("muon/update_rms", SCALAR, "RMS", "RMS of the applied update", "parameter"),
    Topic("muon/routing", TEXT, "table",
          "which parameter went to Newton-Schulz and which to the fallback, and why"),
    # K-FAC
    Topic("kfac/cond_A", SCALAR, "ratio", "condition number of A after damping and clipping",
          "layer"),
    Topic("kfac/cond_G", SCALAR, "ratio", "condition number of G after damping and clipping",
          "layer"),
    Topic("kfac/clipped_A", SCALAR, "count", "eigenvalues of A clipped", "layer"),
    Topic("kfac/clipped_G", SCALAR, "count", "eigenvalues of G clipped", "layer"),
    Topic("kfac/jitter", SCALAR, "value",
          "Cholesky jitter that succeeded (0 = none; -1 = pinv fallback)", "layer"),
    Topic("kfac/policy", TEXT, "text", "eig or woodbury, and why (when it changes)", "layer",
          delivery="always"),
    Topic("kfac/tokens", SCALAR, "count", "T, rows behind the G factor", "layer"),
    Topic("kfac/overflow", SCALAR, "count",
          "factors (A, G) of the step's collection out of range and not folded in", "layer",
          delivery="alarm"),
    # block schedule
    Topic("blocks/relevance", SCALAR, "ratio", "EMA of ||g_l|| / (||W_l|| + eps)", "block"),
    Topic("blocks/active", SCALAR, "count", "active trailing blocks"),
    Topic("blocks/gate", TEXT, "text", "gating state of the block schedule when it changes",
          delivery="always"),
    Topic("blocks/budget", SCALAR, "count",
          "blocks the loss-driven budget adds to (negative: removes from) the selection"),
    # GPU and CUDA memory
    Topic("gpu/utilization", SCALAR, "%", "GPU utilization (NVML), mean and max per window",
          "device"),
    Topic("gpu/memory_used", SCALAR, "bytes", "GPU memory used (NVML)", "device"),
    Topic("gpu/power", SCALAR, "W", "GPU power draw (NVML)", "device"),
    Topic("gpu/temperature", SCALAR, "degC", "GPU temperature (NVML)", "device"),
    Topic("gpu/sm_clock", SCALAR, "MHz", "SM clock (NVML)", "device"),
    Topic("gpu/status", TEXT, "text", "why GPU sampling is off", delivery="always"),
    Topic("cuda/memory_allocated", SCALAR, "bytes", "torch.cuda.memory_allocated", "device"),
    Topic("cuda/max_memory_allocated", SCALAR, "bytes", "torch.cuda.max_memory_allocated",
          "device"),
    # the bus itself
    Topic("probe/overhead_ms", SCALAR, "ms", "time spent by the probe and the bus in this step"),
    Topic("probe/dropped_events", SCALAR, "count", "events dropped by the bounded buffer (total)",
          delivery="alarm"),
    Topic("probe/collector_errors", SCALAR, "count", "collector failures (total)",
          delivery="alarm"),
    Topic("probe/diagnostic_errors", SCALAR, "count",
          "telemetry-only computations that raised inside a step and were left out (total)",
          delivery="alarm"),
    # the training loop, through Probe.log
    Topic("train/loss", SCALAR, "as logged", "training loss", delivery="always"),
    Topic("eval/loss", SCALAR, "as logged", "evaluation loss", delivery="always"),
    Topic("eval/accuracy", SCALAR, "fraction", "evaluation accuracy", delivery="always"),
    Topic("user/*", SCALAR, "as logged", "free names logged by the user", delivery="always"),
)

CATALOGUE: dict[str, Topic] = {t.name: t for t in _ROWS}
_FAMILIES: tuple[Topic, ...] = tuple(t for t in _ROWS if t.name.endswith("/*"))


def lookup(name: str) -> Topic | None:
    """The catalogue row declaring ``name`` (exactly or through a ``family/*``), or None."""
    row = CATALOGUE.get(name)
    if row is not None:
        return row
    for fam in _FAMILIES:
        if name.startswith(fam.name[:-1]) and len(name) > len(fam.name) - 1:
            return fam
    return None


def is_histogram(name: str) -> bool:
    """True when ``name`` is a histogram topic of the catalogue (its values are samples)."""
    row = lookup(name)
    return row is not None and row.kind == HISTOGRAM


def is_declared(name: str) -> bool:
    """True when ``name`` is in the catalogue."""
    return lookup(name) is not None


def markdown_table() -> str:
    """The catalogue as the Markdown table README shows."""
    lines = ["| topic | kind | unit | per | meaning |", "|---|---|---|---|---|"]
    for t in _ROWS:
        lines.append(f"| `{t.name}` | {t.kind} | {t.unit} | {t.per or '-'} | {t.doc} |")
    return "\n".join(lines)
