"""The gradients an optimizer received, kept from the pre-step hook of a sampled step: the
statistics then describe them even when ``step()`` rewrites ``.grad`` in place (schedule-free
AdamW, Ranger's gradient centralization) or drops it (heavyball's ``p.grad = None``)."""

from __future__ import annotations

import torch

from probe.stats import snapshot


class Received:
    """``params`` (those with a gradient before the step), their ``tags`` and ``grads``: the
    given gradient tensors themselves, or copies when ``copy`` (an optimizer known, or not yet
    known, to rewrite them); ``scale`` (a 0-d tensor, or None) is GradScaler's, for a fused
    optimizer that gets scaled gradients and unscales them in its kernel. ``rewritten()``
    tells, from torch's version counters, which of the tensors the step changed in place
    (free: no values read)."""

    __slots__ = ("params", "tags", "grads", "copied", "scale", "ids", "_refs", "_versions")

    def __init__(self, params: list[torch.Tensor], tags: list[dict],
                 grads: list[torch.Tensor], copy: bool, scale: torch.Tensor | None = None,
                 ids: tuple = ()) -> None:
        refs = grads
        self.params, self.tags, self.copied, self.scale = params, tags, copy, scale
        self.ids = ids  # id() of the optimizer's own parameter objects (not local shards)
        self._refs = refs
        self._versions = [g._version for g in refs]
        self.grads = snapshot(refs) if copy else refs

    def rewritten(self) -> list[bool]:
        """For each gradient: did ``step()`` change that tensor in place?"""
        return [g._version != v for g, v in zip(self._refs, self._versions)]

    def unscaled(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (values of the gradients) divided by ``scale``, on the device: no sync."""
        return t if self.scale is None else t / self.scale.to(t.device, t.dtype)

    def unscaled_norms(self, norms: torch.Tensor) -> torch.Tensor:
        """:func:`probe.stats.step_norms` with its gradient rows (|g| and <-update, g>)
        unscaled."""
        if self.scale is not None:
            norms[0::3] = self.unscaled(norms[0::3])
        return norms
