"""The AdamW step Muon applies to the parameters it does not orthogonalize."""

from __future__ import annotations

import torch

from optimizers.adamw_step import eps_floor


def adamw_step(params: list[torch.Tensor], grads: list[torch.Tensor],
               exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
               steps: list[int], *, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, want_rms: bool = False) -> list[torch.Tensor] | None:
    """One AdamW step (decoupled weight decay, bias-corrected), the arithmetic of
    ``torch.optim.AdamW``; ``steps`` are the already incremented step counts.

    With ``want_rms`` returns the RMS of each Adam step ``lr/bc1 * m/denom`` (0-d tensors).
    """
    if not params:
        return [] if want_rms else None
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    step_sizes = [lr / (1.0 - beta1 ** s) for s in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [(1.0 - beta2 ** s) ** 0.5 for s in steps])
    torch._foreach_add_(denom, eps)
    for dtype in {p.dtype for p in params}:  # eps below the dtype's resolution: no m / 0
        floor = eps_floor(eps, dtype)
        if floor is not None:
            torch._foreach_clamp_min_([d for d, p in zip(denom, params) if p.dtype == dtype],
                                      floor)
    rms = None
    if want_rms:
        rms = [(m / d).square().mean().sqrt() * s for m, d, s in zip(exp_avgs, denom,
                                                                       step_sizes)]
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-s for s in step_sizes])
    return rms
