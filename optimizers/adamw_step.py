"""A decoupled-weight-decay Adam (AdamW) update over lists of tensors with foreach kernels.

The arithmetic follows ``torch.optim.AdamW`` (lerp for the first moment, bias-corrected
square root plus eps in the denominator) so an optimizer that filters some gradients and
hands the rest here steps exactly like AdamW on those.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch


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
        torch._foreach_addcdiv_(ps, m1, denom, -step_size)
