"""A decoupled-weight-decay Adam (AdamW) update over lists of tensors with foreach kernels.

The arithmetic follows ``torch.optim.AdamW`` (lerp for the first moment, bias-corrected
square root plus eps in the denominator) so an optimizer that filters some gradients and
hands the rest here steps exactly like AdamW on those.
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import lru_cache

import torch


@lru_cache(maxsize=64)
def eps_floor(eps: float, dtype: torch.dtype) -> float | None:
    """The smallest positive ``dtype`` value when ``eps`` rounds to zero in ``dtype`` (1e-8 in
    float16, or eps=0), else None. Adam's denominator ``sqrt(v) + eps`` is then 0 wherever
    ``v`` is (a zero gradient, or squares that underflow), and ``m / 0`` writes NaN or Inf
    into the weights; clamping the denominator to this floor changes only those entries, so
    every step torch.optim.AdamW takes finitely stays bit-identical."""
    if not dtype.is_floating_point or float(torch.tensor(eps, dtype=dtype)) != 0.0:
        return None
    return float(torch.finfo(dtype).smallest_normal) * float(torch.finfo(dtype).eps)


def adamw_update(params: list[torch.Tensor], grads: list[torch.Tensor],
                 exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                 steps: list[int], decay: list[bool], *, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float) -> None:
    """One AdamW step in place; ``steps`` are the step counts after this step (>= 1) and
    ``decay`` says which parameters take the decoupled weight decay."""
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        # foreach kernels want one device and dtype per list; one step count gives one scalar
        buckets[(p.device, p.dtype, steps[i])].append(i)
    for (_, _, step), idx in buckets.items():
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        m1 = [exp_avgs[i] for i in idx]
        m2 = [exp_avg_sqs[i] for i in idx]
        if weight_decay != 0.0:
            decayed = [params[i] for i in idx if decay[i]]
            if decayed:
                torch._foreach_mul_(decayed, 1.0 - lr * weight_decay)
        torch._foreach_lerp_(m1, gs, 1.0 - beta1)
        torch._foreach_mul_(m2, beta2)
        torch._foreach_addcmul_(m2, gs, gs, 1.0 - beta2)
        step_size = lr / (1.0 - beta1 ** step)
        denom = torch._foreach_sqrt(m2)
        torch._foreach_div_(denom, math.sqrt(1.0 - beta2 ** step))
        torch._foreach_add_(denom, eps)
        floor = eps_floor(eps, ps[0].dtype)
        if floor is not None:
            torch._foreach_clamp_min_(denom, floor)
        torch._foreach_addcdiv_(ps, m1, denom, -step_size)
