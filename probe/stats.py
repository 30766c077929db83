"""Generic optimizer-step statistics, computed on device in a few fused kernels."""

from __future__ import annotations

import math

import torch

_TINY = 1e-30


def abs_sums(grads: list[torch.Tensor]) -> torch.Tensor:
    """sum |g| of each gradient, stacked: non-finite where a NaN or Inf is present.

    The L1 norm is used rather than max-abs (3x slower on CPU) or L2 (squares overflow fp32
    from |g| ~ 1e19); it overflows only when sum |g| passes the dtype's range.
    """
    return torch.stack(torch._foreach_norm(grads, 1))


def nonfinite_mask(grads: list[torch.Tensor]) -> list[bool]:
    """Which gradients hold a NaN or Inf, read on the host (a sync on CUDA).

    The common, clean case costs one fused pass (torch's AMP finiteness check); only when it
    fires are the per-gradient norms computed to name the culprits.
    """
    if _fused_all_finite(grads):
        return [False] * len(grads)
    return [not math.isfinite(v) for v in abs_sums(grads).tolist()]


def _fused_all_finite(grads: list[torch.Tensor]) -> bool:
    # torch's AMP check scans every gradient in one call and raises one flag; it multiplies
    # them by inv_scale = 1.0 in place, which leaves every value (NaN, -0.0, subnormals)
    # bit-identical. Gradients it does not take (sparse, mixed devices) go the slow way.
    dev = grads[0].device
    found = torch.zeros(1, device=dev)
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, device=dev))
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return not found.item()


def step_stats(before: list[torch.Tensor], after: list[torch.Tensor],
               grads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-parameter vectors (length P) and totals (0-d) of the generic statistics.

    ``grad/norm``, ``param/norm`` (before the step), ``update/norm`` (after - before),
    ``update/ratio`` = update norm / param norm, ``update/cos_grad`` = cos(-update, grad).
    """
    updates = torch._foreach_sub(after, before)
    g = torch.stack(torch._foreach_norm(grads)).float()
    w = torch.stack(torch._foreach_norm(before)).float()
    u = torch.stack(torch._foreach_norm(updates)).float()
    dots = torch.stack([torch.vdot(up.reshape(-1).float(), gr.reshape(-1).float())
                        for up, gr in zip(updates, grads)])
    return {
        "grad/norm": g,
        "param/norm": w,
        "update/norm": u,
        # a zero-norm parameter (a zero-initialised bias) has no meaningful ratio: NaN says so
        "update/ratio": torch.where(w > 0, u / w.clamp_min(_TINY), torch.full_like(u, math.nan)),
        "update/cos_grad": -dots / (u * g).clamp_min(_TINY),
        "total/grad/norm": g.square().sum().sqrt(),
        "total/param/norm": w.square().sum().sqrt(),
        "total/update/norm": u.square().sum().sqrt(),
        "updates": updates,
    }


def value_sample(t: torch.Tensor, max_values: int = 1024) -> torch.Tensor:
    """An evenly strided sample of at most ``max_values`` entries, for histograms."""
    flat = t.detach().reshape(-1)
    stride = max(1, -(-flat.numel() // max_values))
    return flat[::stride]
