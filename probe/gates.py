"""Callables for benchmark gates: one optimizer step, with or without a probe attached."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import probe


def synchronized(fn: Callable[[], Any], device: torch.device | str | None) -> Callable[[], None]:
    """``fn`` followed by a device synchronize on CUDA, so a timed call holds its GPU work
    (CUDA launches are asynchronous); ``fn`` itself on CPU or when ``device`` is None."""
    if not callable(fn):
        raise ValueError(f"fn must be a callable taking no argument, got {fn!r}")
    dev = None if device is None else torch.device(device)
    if dev is None or dev.type != "cuda":
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize(dev)

    return run


def _model_device(model: nn.Module) -> torch.device | None:
    p = next(model.parameters(), None)
    return None if p is None else p.device


def step_callable(model: nn.Module, optimizer: Any, inputs: torch.Tensor,
                  targets: torch.Tensor,
                  loss_fn: Callable[..., torch.Tensor] = nn.functional.cross_entropy
                  ) -> Callable[[], None]:
    """A callable doing one training step (forward, backward, step, zero_grad); on CUDA it
    synchronizes before returning so the timed region holds the device work."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (callable(getattr(optimizer, "step", None))
            and callable(getattr(optimizer, "zero_grad", None))):
        raise ValueError("optimizer must have step() and zero_grad(), got "
                         f"{type(optimizer).__name__}")
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise ValueError("inputs and targets must be tensors")
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {loss_fn!r}")

    def step() -> None:
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return synchronized(step, _model_device(model))


def probed_step_callable(model: nn.Module, optimizer: torch.optim.Optimizer,
                         inputs: torch.Tensor, targets: torch.Tensor,
                         loss_fn: Callable[..., torch.Tensor] = nn.functional.cross_entropy,
                         **attach_kwargs: Any) -> tuple[Callable[[], None], probe.Probe]:
    """``step_callable`` with a probe attached (``attach_kwargs`` go to ``probe.attach``);
    returns the callable and the probe, which the caller closes."""
    step = step_callable(model, optimizer, inputs, targets, loss_fn)
    return step, probe.attach(optimizer, model=model, **attach_kwargs)


def paused_callable(fn: Callable[[], Any], p: probe.Probe) -> Callable[[], None]:
    """``fn`` run with ``p`` paused: the baseline for the probed ``fn`` on the same model,
    optimizer and memory (two copies of a model differ by a percent or two per step, as much
    as the overhead a gate bounds)."""
    if not callable(fn):
        raise ValueError(f"fn must be a callable taking no argument, got {fn!r}")
    if not isinstance(p, probe.Probe):
        raise ValueError(f"p must be a probe.Probe, got {type(p).__name__}")

    def run() -> None:
        with p.paused():
            fn()

    return run
