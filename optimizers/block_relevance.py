"""Pure math of the block schedule: per-block relevance, its EMA, suffix selection, loss
stability.

Relevance of block l is ``||g_l|| / (||W_l|| + eps)`` over the block's concatenated
gradients and weights: how hard the loss still pulls on the block relative to its size.
Everything on tensors stays on their device (no host sync); the selection and the
stability test work on host floats, read once per decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def block_index(sizes: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """The block of each tensor, for blocks holding ``sizes[l]`` tensors in order."""
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"sizes must be ints >= 1, got {list(sizes)!r}")
    counts = torch.tensor(list(sizes), dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(sizes)), counts).to(device)


def tensor_norms(tensors: Sequence[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """L2 norm (float32) of each tensor, gathered on ``device``; a None counts as 0.

    One fused ``_foreach_norm`` per device (two when float64 tensors are among them: those
    accumulate in float64); nothing is read back to the host.
    """
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_device: dict[tuple[torch.device, bool], list[int]] = {}
    for i, t in enumerate(tensors):
        if t is not None:
            # a float32 accumulator would narrow float64 (torch refuses): take those apart
            wide = t.dtype in (torch.float64, torch.complex128)
            by_device.setdefault((t.device, wide), []).append(i)
    for (dev, wide), idx in by_device.items():
        group = [tensors[i] for i in idx]
        if any(t.is_sparse for t in group):
            norms = [torch.linalg.vector_norm(t.coalesce().values() if t.is_sparse else t,
                                              dtype=None if wide else torch.float32).float()
                     for t in group]
        elif wide:
            norms = [v.float() for v in torch._foreach_norm(group, 2)]
        else:
            # float32 accumulation lifts fp16/bf16; torch refuses to narrow float64 that way,
            # so float64 tensors keep their dtype and are cast after
            norms = [None] * len(group)
            wide = [j for j, t in enumerate(group) if t.dtype is torch.float64]
            narrow = [j for j, t in enumerate(group) if t.dtype is not torch.float64]
            for js, dtype in ((wide, None), (narrow, torch.float32)):
                if js:
                    got = torch._foreach_norm([group[j] for j in js], 2, dtype=dtype)
                    for j, v in zip(js, got):
                        norms[j] = v.float()
        for i, v in zip(idx, norms):
            out[i] = v if dev == device else v.to(device, non_blocking=True)
    zero = None
    for i, v in enumerate(out):
        if v is None:
            if zero is None:
                zero = torch.zeros((), dtype=torch.float32, device=device)
            out[i] = zero
    return torch.stack(out)  # type: ignore[arg-type]


def block_norms(tensors: Sequence[torch.Tensor | None], index: torch.Tensor,
                n_blocks: int) -> torch.Tensor:
    """L2 norm of each block's concatenated tensors; ``index[i]`` is the block of tensor i."""
    sq = tensor_norms(tensors, index.device).square()
    return torch.zeros(n_blocks, dtype=torch.float32, device=index.device) \
        .index_add_(0, index, sq).sqrt()


def block_relevance(grads: Sequence[torch.Tensor | None], weights: Sequence[torch.Tensor],
                    index: torch.Tensor, n_blocks: int, eps: float = 1e-8) -> torch.Tensor:
    """``s_l = ||g_l||_2 / (||W_l||_2 + eps)`` per block, as a float32 tensor on ``index``'s
    device (a missing gradient counts as zero)."""
    if len(grads) != len(weights) or len(weights) != index.numel():
        raise ValueError(f"grads ({len(grads)}), weights ({len(weights)}) and index "
                         f"({index.numel()}) must have the same length")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    g = block_norms(grads, index, n_blocks)
    w = block_norms([t.detach() for t in weights], index, n_blocks)
    return g / (w + eps)


def ema_update(ema: torch.Tensor, s: torch.Tensor, beta: float) -> torch.Tensor:
    """``beta * ema + (1 - beta) * s`` per block, without a host sync.

    A NaN entry of ``ema`` (never measured) takes ``s`` as is; a non-finite ``s`` leaves
    its entry unchanged, so one bad gradient does not poison the average for good.
    """
    upd = torch.where(torch.isnan(ema), s, beta * ema + (1.0 - beta) * s)
    return torch.where(torch.isfinite(s), upd, ema)


def select_suffix(relevance: Sequence[float], threshold: float, min_active: int = 1,
                  max_active: int | None = None) -> int:
    """Size of the smallest trailing set of blocks holding ``threshold`` of the total
    relevance, clamped to ``[min_active, max_active]``.

    Relevance that is non-finite, negative or all zero says nothing: every block allowed
    (``max_active``) stays active.
    """
    n = len(relevance)
    if n < 1:
        raise ValueError("relevance must hold at least one block")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    hi = n if max_active is None else max_active
    if not 1 <= min_active <= hi <= n:
        raise ValueError(f"need 1 <= min_active ({min_active}) <= max_active ({hi}) <= "
                         f"number of blocks ({n})")
    vals = [float(r) for r in relevance]
    total = math.fsum(vals)
    if not all(math.isfinite(v) and v >= 0.0 for v in vals) or total <= 0.0:
        return hi
    # relevance comes from float32 EMAs: a tie within float32 rounding counts as reached
    target = threshold * total * (1.0 - 1e-6)
    acc = 0.0
    k = n
    for j in range(1, n + 1):
        acc += vals[n - j]
        if acc >= target:
            k = j
            break
    return min(max(k, min_active), hi)


def loss_stability(losses: Sequence[float], window: int) -> tuple[float, float]:
    """``(relative change, coefficient of variation)`` of the loss over the last ``window``.

    Relative change: ``|mean(last) - mean(previous)| / |mean(previous)|`` between the last
    two windows; CV: population std / |mean| of the last window. ``(inf, inf)`` until
    ``2 * window`` losses exist or when a loss is non-finite.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an int >= 2, got {window!r}")
    if len(losses) < 2 * window:
        return math.inf, math.inf
    vals = [float(v) for v in losses[-2 * window:]]
    if not all(math.isfinite(v) for v in vals):
        return math.inf, math.inf
    prev, last = vals[:window], vals[window:]
    m1 = math.fsum(prev) / window
    m2 = math.fsum(last) / window
    tiny = 1e-12
    rel = abs(m2 - m1) / max(abs(m1), tiny)
    var = math.fsum((v - m2) ** 2 for v in last) / window
    cv = math.sqrt(var) / max(abs(m2), tiny)
    return rel, cv
