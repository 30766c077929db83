"""Generic optimizer-step statistics, computed on device in a few fused kernels.

On a small model every torch call costs more than the arithmetic it does (each one meets a
cold cache after the forward and backward passes), so these functions count their calls:
squared norms come from one ``_foreach_powsum`` per list, the update is formed in place in
the snapshot, and all per-parameter numbers leave in one stacked tensor.
"""

from __future__ import annotations

import math

import torch

_TINY = 1e-30
_F32 = torch.float32


def abs_sums(grads: list[torch.Tensor]) -> torch.Tensor:
    """sum |g| of each gradient, stacked: non-finite where a NaN or Inf is present.

    The L1 norm is used rather than max-abs (3x slower on CPU) or L2 (squares overflow fp32
    from |g| ~ 1e19); it overflows only when sum |g| passes the dtype's range.
    """
    return torch.stack(torch._foreach_norm(grads, 1))


class FiniteCheck:
    """Which gradients hold a NaN or Inf, read on the host (a sync on CUDA).

    The common, clean case costs one fused pass (torch's AMP finiteness check) whose flag
    tensors are kept between calls: allocating them each step cost as much as the pass.
    Only when it fires are the per-gradient norms computed to name the culprits.
    """

    def __init__(self) -> None:
        self._flags: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def mask(self, grads: list[torch.Tensor]) -> list[bool]:
        """One bool per gradient: True where it holds a NaN or Inf."""
        if self.all_finite(grads):
            return [False] * len(grads)
        return [not math.isfinite(v) for v in abs_sums(grads).tolist()]

    def all_finite(self, grads: list[torch.Tensor]) -> bool:
        """True when every gradient is finite; gradients are left bit-identical."""
        dev = grads[0].device
        flags = self._flags.get(dev)
        if flags is None:
            flags = self._flags[dev] = (torch.zeros(1, device=dev), torch.ones(1, device=dev))
        found, one = flags
        # the AMP check multiplies by inv_scale = 1.0 in place, which leaves every value (NaN,
        # -0.0, subnormals) bit-identical; it only ever sets `found`, so a clean pass needs no
        # reset. Gradients it does not take (sparse, mixed devices) go the slow way.
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
        except (RuntimeError, TypeError, NotImplementedError):
            return False
        if not found.item():
            return True
        found.zero_()
        return False


def nonfinite_mask(grads: list[torch.Tensor]) -> list[bool]:
    """Which gradients hold a NaN or Inf (a one-off :class:`FiniteCheck`)."""
    return FiniteCheck().mask(grads)


def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies of ``params`` (one fused call), taken before the step."""
    with torch.no_grad():
        return torch._foreach_clone(params)


def step_stats(before: list[torch.Tensor], after: list[torch.Tensor],
               grads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-parameter vectors (length P, float32) and totals (0-d) of the generic statistics.

    ``grad/norm``, ``param/norm`` (before the step), ``update/norm`` (after - before),
    ``update/ratio`` = update norm / param norm, ``update/cos_grad`` = cos(-update, grad);
    ``table`` holds the five vectors as rows of one (5, P) tensor. ``before`` (a
    :func:`snapshot`) is consumed: it holds ``before - after``, the negated update, afterwards,
    also returned as ``neg_updates``.
    """
    with torch.no_grad():
        w2 = torch._foreach_powsum(before, 2, dtype=_F32)
        torch._foreach_sub_(before, after)
        neg = before
        g2 = torch._foreach_powsum(grads, 2, dtype=_F32)
        u2 = torch._foreach_powsum(neg, 2, dtype=_F32)
        dots = [torch.vdot(_flat32(n), _flat32(g)) for n, g in zip(neg, grads)]
        sq = torch.stack((*g2, *w2, *u2, *dots)).view(4, -1)
        norms = sq[:3].sqrt()
        g, w, u = norms
        totals = sq[:3].sum(1).sqrt()
        # a zero-norm parameter (a zero-initialised bias) has no meaningful ratio: NaN says so
        ratio = torch.where(w > 0, u / w, math.nan)
        cos = sq[3] / (u * g).clamp_min(_TINY)
        table = torch.cat((norms, ratio.unsqueeze(0), cos.unsqueeze(0)))
    t = totals
    return {"grad/norm": g, "param/norm": w, "update/norm": u, "update/ratio": ratio,
            "update/cos_grad": cos, "table": table, "total/grad/norm": t[0],
            "total/param/norm": t[1], "total/update/norm": t[2], "totals": totals,
            "neg_updates": neg}


def _flat32(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).float()  # float() is the tensor itself when it is float32 already


def value_sample(t: torch.Tensor, max_values: int = 1024) -> torch.Tensor:
    """An evenly strided sample of at most ``max_values`` entries, for histograms."""
    flat = t.detach().reshape(-1)
    stride = max(1, -(-flat.numel() // max_values))
    return flat[::stride]
