"""Callables for benchmark gates: one optimizer step, with or without a probe attached."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import probe


def _sync_for(model: nn.Module) -> Callable[[], None]:
    p = next(model.parameters(), None)
    if p is not None and p.device.type == "cuda":
        dev = p.device
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def step_callable(model: nn.Module, optimizer: Any, inputs: torch.Tensor,
                  targets: torch.Tensor,
                  loss_fn: Callable[..., torch.Tensor] = nn.functional.cross_entropy
                  ) -> Callable[[], None]:
    """A callable doing one training step (forward, backward, step, zero_grad); on CUDA it
    synchronizes before returning so the timed region holds the device work."""
    sync = _sync_for(model)

    def step() -> None:
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()

    return step


def probed_step_callable(model: nn.Module, optimizer: torch.optim.Optimizer,
                         inputs: torch.Tensor, targets: torch.Tensor,
                         loss_fn: Callable[..., torch.Tensor] = nn.functional.cross_entropy,
                         **attach_kwargs: Any) -> tuple[Callable[[], None], probe.Probe]:
    """``step_callable`` with a probe attached (``attach_kwargs`` go to ``probe.attach``);
    returns the callable and the probe, which the caller closes."""
    p = probe.attach(optimizer, model=model, **attach_kwargs)
    return step_callable(model, optimizer, inputs, targets, loss_fn), p
