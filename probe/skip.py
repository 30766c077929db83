"""Skipping an optimizer step from its pre-hook: hide the gradients, restore what moved.

torch's step pre-hook cannot cancel the step, so a skipped step is made a no-op in two
layers: the gradients are hidden (``p.grad = None``, which every torch optimizer reads as
"no update for this parameter"), and the parameters, the optimizer state and the group
hyper-parameters are snapshotted and restored bit for bit after the step, for optimizers that
move something anyway (a step counter, a decay applied without a gradient). The snapshot is
taken only on the steps being skipped, so a healthy run pays nothing.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return copy.deepcopy(value)


def _restore_value(current: Any, saved: Any) -> Any:
    # copy into the live tensor when shapes allow: optimizers may hold references to it
    if (isinstance(current, torch.Tensor) and isinstance(saved, torch.Tensor)
            and current.shape == saved.shape and current.dtype == saved.dtype
            and current.device == saved.device):
        with torch.no_grad():
            current.copy_(saved)
        return current
    return saved


class SkippedStep:
    """Everything a step could change, saved before it and put back by ``restore()``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.values = [p.detach().clone() for p in self.params]
        self.grads = [p.grad for p in self.params]
        self.state = {p: {k: _clone(v) for k, v in optimizer.state[p].items()}
                      for p in self.params if p in optimizer.state}
        self.groups = [{k: _clone(v) for k, v in g.items() if k != "params"}
                       for g in optimizer.param_groups]
        for p in self.params:
            p.grad = None

    def restore(self, grads: bool = True) -> None:
        """Put parameters, state and group settings back as they were, and the gradients too
        unless ``grads`` is False (the step raised and the loop has set new ones since)."""
        opt = self.optimizer
        with torch.no_grad():
            for p, v, g in zip(self.params, self.values, self.grads):
                p.copy_(v)
                if grads:
                    p.grad = g
        for p in self.params:
            saved = self.state.get(p)
            if saved is None:
                opt.state.pop(p, None)
                continue
            live = opt.state[p]
            for k in [k for k in live if k not in saved]:
                del live[k]
            for k, v in saved.items():
                live[k] = _restore_value(live.get(k), v)
        for group, saved in zip(opt.param_groups, self.groups):
            for k in [k for k in group if k != "params" and k not in saved]:
                del group[k]
            for k, v in saved.items():
                group[k] = _restore_value(group.get(k), v)
