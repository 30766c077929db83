"""The probe's own state inside the optimizer's ``state_dict``, so a resumed run continues.

``optimizer.state_dict()`` gains an ``"optprobe"`` entry (the probe's step counter and its
running aggregates); ``optimizer.load_state_dict(sd)`` on an optimizer with a probe attached
takes that entry back, so the next step is logged as the step after the checkpoint: the same
TensorBoard series, with no gap and no repeat. torch's own loading never sees the entry.
"""

from __future__ import annotations

from typing import Any

import torch

KEY = "optprobe"


class CheckpointHooks:
    """Registers the state-dict hooks on ``optimizer`` for ``probe``; ``remove()`` ends them."""

    def __init__(self, optimizer: torch.optim.Optimizer, probe: Any) -> None:
        self.probe = probe
        self._loaded: dict | None = None
        self.handles: list = []
        try:  # one at a time, so a failure leaves none of them behind
            self.handles.append(optimizer.register_state_dict_post_hook(self._save))
            self.handles.append(optimizer.register_load_state_dict_pre_hook(self._take))
            self.handles.append(optimizer.register_load_state_dict_post_hook(self._apply))
        except BaseException:
            self.remove()
            raise

    def _save(self, optimizer, state_dict: dict) -> dict:
        # deliver what is pending first, so the aggregates include everything logged so far
        self.probe.flush()
        state_dict[KEY] = self.probe._checkpoint_state()
        return state_dict

    def _take(self, optimizer, state_dict: dict) -> dict:
        # torch hands pre-hooks a shallow copy: popping here leaves the caller's dict whole
        entry = state_dict.pop(KEY, None)
        if entry is not None and not isinstance(entry, dict):
            raise ValueError(f"state_dict[{KEY!r}] must be a dict written by optprobe, "
                             f"got {type(entry).__name__}")
        self._loaded = entry
        return state_dict

    def _apply(self, optimizer) -> None:
        # applied only after torch's own load succeeded, so a failed load changes nothing
        entry, self._loaded = self._loaded, None
        if entry is not None:
            self.probe._load_checkpoint_state(entry)

    def remove(self) -> None:
        """Unregister every hook."""
        for h in self.handles:
            h.remove()
        self.handles = []
