"""``BlockSchedule``: wrap any optimizer and train only the trailing blocks that still matter.

The model's blocks are given first to last. On full steps every block's relevance
``||g_l|| / (||W_l|| + eps)`` is measured and smoothed (EMA); once the gate opens, the
schedule keeps training only the smallest trailing suffix holding ``threshold`` of the total
relevance and turns ``requires_grad`` off for the front blocks, so backward stops at the
first active block and the front gets no update (its optimizer state is kept). Every
``probe_every`` steps one full step measures all blocks again; a loss EMA over the probe
intervals grows or shrinks the suffix; the last ``final_full_fraction`` of ``total_steps``
trains every block again.

Host reads happen only at decisions (a selection after a full step, the stability test while
the gate waits); the steady suffix steps run without any host sync.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

import hooks
from optimizers.block_relevance import (
    block_index,
    block_relevance,
    ema_update,
    loss_stability,
    select_suffix,
)
from optimizers.diagnostics_guard import DiagnosticGuard

WARMUP, WAITING, OPEN, RECOVERY = "warmup", "waiting", "open", "recovery"
_STATE_KEY = "block_schedule"

LossLike = float | int | torch.Tensor | Callable[[], Any] | None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    """An int or float (not a bool) that converts to a float: 10**400 does not."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        float(x)
    except OverflowError:
        return False
    return True


def _ceil_fraction(fraction: float, total: int) -> int:
    # 0.1 * 1000 is 100.00000000000001 in floats: do not round that up to 101
    return int(math.ceil(fraction * total - 1e-9))


def _to_host(values: Iterable[float | torch.Tensor]) -> list[float]:
    """Floats of a mix of numbers and 0-d tensors, reading each device once."""
    vals = list(values)
    out: list[float] = [0.0] * len(vals)
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(vals):
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(i)
        else:
            out[i] = float(v)
    for _, idx in by_device.items():
        host = torch.stack([vals[i].reshape(()).float() for i in idx]).cpu().tolist()
        for i, x in zip(idx, host):
            out[i] = x
    return out


class BlockSchedule(torch.optim.Optimizer):
    """Trains a trailing suffix of ``blocks`` (first to last) chosen by gradient relevance.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own, so LR
    schedulers and ``probe.attach`` work on the wrapper; ``step(loss)`` takes the step's loss
    (a number, a 0-d tensor kept on device, or a closure) for the gate and the budget.
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 blocks: Iterable[nn.Module | tuple[str, nn.Module]], *,
                 beta: float = 0.9, threshold: float = 0.9, min_active: int = 1,
                 max_active: int | None = None, freeze_after: int | float = 0,
                 probe_every: int = 100, total_steps: int | None = None,
                 final_full_fraction: float = 0.1, stable_window: int | None = None,
                 stable_rel_change: float = 0.02, stable_cv: float = 0.2,
                 grow_above: float = 1.05, shrink_below: float = 0.95,
                 budget_beta: float = 0.9, eps: float = 1e-8,
                 bus: hooks.Bus | None = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, "
                             f"got {type(optimizer).__name__}")
        if isinstance(optimizer, BlockSchedule):
            raise ValueError("optimizer must not itself be a BlockSchedule")
        names, params = self._parse_blocks(optimizer, blocks)
        n = len(names)
        if not (_is_real(beta) and 0.0 <= beta < 1.0):
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if not (_is_real(threshold) and 0.0 < threshold <= 1.0):
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        if not (_is_int(min_active) and 1 <= min_active <= n):
            raise ValueError(f"min_active must be an int in [1, {n}] (the number of blocks), "
                             f"got {min_active!r}")
        if max_active is None:
            max_active = n
        if not (_is_int(max_active) and min_active <= max_active <= n):
            raise ValueError(f"max_active must be None or an int in [min_active={min_active}, "
                             f"{n}], got {max_active!r}")
        # fractions of total_steps are taken in floats: a step count past sys.maxsize is not one
        if total_steps is not None and not (_is_int(total_steps)
                                            and 1 <= total_steps <= sys.maxsize):
            raise ValueError(f"total_steps must be None or an int >= 1 (and <= {sys.maxsize}), "
                             f"got {total_steps!r}")
        if _is_int(freeze_after):
            if freeze_after < 0:
                raise ValueError(f"freeze_after must be an int >= 0 (steps) or a float in "
                                 f"[0, 1) (fraction of total_steps), got {freeze_after!r}")
            freeze_steps = freeze_after
        elif isinstance(freeze_after, float):
            if not 0.0 <= freeze_after < 1.0:
                raise ValueError(f"freeze_after as a float is a fraction of total_steps and "
                                 f"must be in [0, 1), got {freeze_after!r}")
            if total_steps is None:
                raise ValueError("freeze_after as a fraction (float) needs total_steps")
            freeze_steps = _ceil_fraction(freeze_after, total_steps)
        else:
            raise ValueError(f"freeze_after must be an int >= 0 (steps) or a float in [0, 1) "
                             f"(fraction of total_steps), got {freeze_after!r}")
        if not (_is_int(probe_every) and probe_every >= 1):
            raise ValueError(f"probe_every must be an int >= 1, got {probe_every!r}")
        if not (_is_real(final_full_fraction) and 0.0 <= final_full_fraction < 1.0):
            raise ValueError(f"final_full_fraction must be in [0, 1), got "
                             f"{final_full_fraction!r}")
        # the loss history keeps 2 * stable_window values: a deque's maxlen is a C ssize_t
        if stable_window is not None and not (_is_int(stable_window)
                                              and 2 <= stable_window <= sys.maxsize // 2):
            raise ValueError(f"stable_window must be None or an int >= 2 (and <= "
                             f"{sys.maxsize // 2}), got {stable_window!r}")
        if not (_is_real(stable_rel_change) and 0.0 <= stable_rel_change < math.inf):
            raise ValueError(f"stable_rel_change must be a finite number >= 0, got "
                             f"{stable_rel_change!r}")
        if not (_is_real(stable_cv) and 0.0 <= stable_cv < math.inf):
            raise ValueError(f"stable_cv must be a finite number >= 0, got {stable_cv!r}")
        if not (_is_real(grow_above) and grow_above >= 1.0):
            raise ValueError(f"grow_above must be >= 1 (inf turns growth off), got "
                             f"{grow_above!r}")
        if not (_is_real(shrink_below) and 0.0 <= shrink_below <= 1.0):
            raise ValueError(f"shrink_below must be in [0, 1] (0 turns shrinking off), got "
                             f"{shrink_below!r}")
        if not (_is_real(budget_beta) and 0.0 <= budget_beta < 1.0):
            raise ValueError(f"budget_beta must be in [0, 1), got {budget_beta!r}")
        if not (_is_real(eps) and 0.0 < eps < math.inf):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        bus = hooks.resolve_bus(bus)

        self.optimizer = optimizer
        # what torch.optim.Optimizer.__init__ sets up, minus param_groups/state/defaults:
        # those are the wrapped optimizer's (properties below), so nothing is copied
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

        self.bus = bus
        self._guard = DiagnosticGuard("BlockSchedule")
        self.block_names: tuple[str, ...] = tuple(names)
        self._blocks: list[list[torch.Tensor]] = params
        self._flat: list[torch.Tensor] = [p for ps in params for p in ps]
        self._device = self._flat[0].device
        self._index = block_index([len(ps) for ps in params], self._device)
        self._tags = [{"param": name} for name in names]

        self.beta = float(beta)
        self.threshold = float(threshold)
        self.min_active = min_active
        self.max_active = max_active
        self.freeze_after = freeze_after
        self.probe_every = probe_every
        self.total_steps = total_steps
        self.final_full_fraction = float(final_full_fraction)
        self.stable_window = stable_window
        self.stable_rel_change = float(stable_rel_change)
        self.stable_cv = float(stable_cv)
        self.grow_above = float(grow_above)
        self.shrink_below = float(shrink_below)
        self.budget_beta = float(budget_beta)
        self.eps = float(eps)
        # no block freezes before one full step has measured every block
        self._freeze_start = max(freeze_steps, 1)
        self._recovery_start: int | None = None
        if total_steps is not None and final_full_fraction > 0.0:
            self._recovery_start = total_steps - _ceil_fraction(final_full_fraction,
                                                                total_steps)
        self._budget_lo = min_active - max_active
        self._budget_hi = max_active - min_active

        self._t = 0  # steps taken
        self._ema = torch.full((n,), math.nan, dtype=torch.float32, device=self._device)
        self._active = n  # active blocks of the next step
        self._applied = n  # active blocks as requires_grad says
        self._phase = WARMUP
        self._gate_open = False
        self._gate_note = ""
        self._announced: str | None = None
        self._selected = n  # the suffix the last selection chose (budget included)
        self._selections = 0
        self._next_probe: int | None = None
        self._budget = 0
        self._loss_ema: float | None = None
        self._interval_sum: float | torch.Tensor = 0.0
        self._interval_count = 0
        self._stable = (math.inf, math.inf)
        self._loss_hist: deque = deque(maxlen=2 * stable_window if stable_window else 1)

    @staticmethod
    def _parse_blocks(optimizer: torch.optim.Optimizer,
                      blocks: Iterable[nn.Module | tuple[str, nn.Module]]
                      ) -> tuple[list[str], list[list[torch.Tensor]]]:
        if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.Sequential,
                                                                     nn.ModuleList)):
            raise ValueError("blocks must be an ordered list of modules (or (name, module) "
                             f"pairs), got a single {type(blocks).__name__}")
        try:
            entries = list(blocks)
        except TypeError:
            raise ValueError(f"blocks must be an ordered list of modules, got "
                             f"{type(blocks).__name__}") from None
        if not entries:
            raise ValueError("blocks must hold at least one module, got none")
        width = len(str(len(entries) - 1))
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        seen: dict[int, int] = {}
        names: list[str] = []
        params: list[list[torch.Tensor]] = []
        for i, entry in enumerate(entries):
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
                name, module = entry
            else:
                name, module = f"block{i:0{width}d}", entry
            if not isinstance(module, nn.Module):
                raise ValueError(f"blocks[{i}] must be an nn.Module or a (name, module) pair, "
                                 f"got {type(module).__name__}")
            ps = [p for p in module.parameters() if p.requires_grad]
            if not ps:
                raise ValueError(f"blocks[{i}] ({name}) has no parameter with requires_grad")
            for p in ps:
                if id(p) in seen:
                    raise ValueError(f"blocks[{i}] ({name}) shares a parameter with "
                                     f"blocks[{seen[id(p)]}]: blocks must be disjoint")
                if id(p) not in in_opt:
                    raise ValueError(f"blocks[{i}] ({name}) has a parameter that the optimizer "
                                     f"does not update")
                seen[id(p)] = i
            names.append(name)
            params.append(ps)
        if len(set(names)) != len(names):
            raise ValueError(f"block names must be unique, got {names}")
        return names, params

    # -- the wrapped optimizer's containers ----------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    # -- what the schedule says ----------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Number of blocks."""
        return len(self._blocks)

    @property
    def active(self) -> int:
        """Active trailing blocks of the next step."""
        return self._active

    @property
    def phase(self) -> str:
        """Gate phase of the next step: warmup, waiting, open or recovery."""
        return self._phase

    @property
    def budget(self) -> int:
        """Blocks the loss-driven budget adds to (or, negative, removes from) the selection."""
        return self._budget

    @property
    def steps(self) -> int:
        """Steps taken."""
        return self._t

    def is_probe(self) -> bool:
        """True when the next step is a full probe step of the open phase."""
        return self._phase == OPEN and self._active == self.num_blocks

    def relevance(self) -> list[float]:
        """The relevance EMA per block (NaN before the first measurement); reads the device."""
        return self._ema.tolist()

    def frozen_blocks(self) -> list[str]:
        """Names of the blocks frozen for the next step."""
        return list(self.block_names[:self.num_blocks - self._active])

    # -- the step ------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """The wrapped optimizer's ``add_param_group`` (new parameters are never frozen)."""
        self.optimizer.add_param_group(param_group)

    def step(self, loss: LossLike = None) -> Any:  # type: ignore[override]
        """One step of the wrapped optimizer on the active suffix, then the next step's plan.

        ``loss``: this step's loss (number or 0-d tensor), a closure (passed to the wrapped
        optimizer; its result is the loss), or None. Returns the closure's result, or None.
        """
        closure = loss if callable(loss) else None
        if closure is None and loss is not None:
            if not (_is_real(loss) or (isinstance(loss, torch.Tensor) and loss.numel() == 1)):
                raise ValueError(f"loss must be None, a number, a 1-element tensor or a "
                                 f"closure, got {type(loss).__name__}")
        elif loss is None and self.stable_window is not None and not self._gate_open:
            raise ValueError("step(loss=...) needs the loss while stable_window gates the "
                             "schedule (a number, a 0-d tensor or a closure)")
        if closure is None and not any(p.grad is not None for g in self.param_groups
                                       for p in g["params"]):
            # no gradient anywhere (a skipped step): no counter, EMA, loss or gate moves
            return None
        t = self._t
        k = self._active
        n = self.num_blocks
        if k < n:
            # frozen blocks take no update whatever grads linger (set_to_none=False, stale);
            # every torch optimizer skips a parameter whose grad is None
            for ps in self._blocks[:n - k]:
                for p in ps:
                    p.grad = None
        out = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        if closure is not None:
            loss = out
        with self.bus.span("blocks/select", device=self._device):
            self._record_loss(loss)
            # a step whose gradients were all hidden (a skipped step) measures nothing
            if k == n and any(p.grad is not None for p in self._flat):
                self._measure(n)
            self._guard.run(self.bus, "blocks/telemetry", self._emit, k)
            self._plan(t + 1, measured=k == n)
            self._t = t + 1
        return out

    def _measure(self, n: int) -> None:
        """Fold this full step's relevance into the EMA; a failed read leaves the EMA as is."""
        try:
            s = block_relevance([p.grad for p in self._flat], self._flat, self._index, n,
                                self.eps)
        except Exception as exc:  # the relevance read must not cost the step already taken
            self._guard.failed(self.bus, "blocks/relevance", exc)
            return
        self._ema = ema_update(self._ema, s, self.beta)

    def _record_loss(self, loss: Any) -> None:
        if loss is None:
            return
        v = loss.detach().reshape(()).float() if isinstance(loss, torch.Tensor) else float(loss)
        self._interval_sum = self._interval_sum + v
        self._interval_count += 1
        if self.stable_window is not None and not self._gate_open:
            self._loss_hist.append(v)

    def _emit(self, k: int) -> None:
        bus = self.bus
        if self._phase != self._announced and bus.wants("blocks/gate"):
            bus.emit("blocks/gate", self._phase_text())
        self._announced = self._phase
        if bus.wants("blocks/relevance"):
            bus.emit_each("blocks/relevance", self._ema, self._tags)
        if bus.wants("blocks/active"):
            bus.emit("blocks/active", float(k))
        if bus.wants("blocks/budget"):
            bus.emit("blocks/budget", float(self._budget))

    def _phase_text(self) -> str:
        if self._phase == WARMUP:
            return f"warmup: every block trains until step {self._freeze_start}"
        if self._phase == WAITING:
            rel, cv = self._stable
            return (f"waiting: every block trains until the loss is stable over "
                    f"{self.stable_window} steps (mean change {rel:.3g} <= "
                    f"{self.stable_rel_change:g} and cv {cv:.3g} <= {self.stable_cv:g})")
        if self._phase == OPEN:
            return (f"open at step {self._t}: a trailing suffix trains, one full probe step "
                    f"every {self.probe_every}{self._gate_note}")
        return (f"recovery: every block trains from step {self._recovery_start} to "
                f"{self.total_steps}")

    # -- planning the next step ----------------------------------------------------------
    def _plan(self, t: int, measured: bool) -> None:
        """Decide phase and active suffix of step ``t``; ``measured``: step t-1 was full."""
        n = self.num_blocks
        if self._recovery_start is not None and t >= self._recovery_start:
            phase, k = RECOVERY, n
        elif t < self._freeze_start:
            phase, k = WARMUP, n
        else:
            if not self._gate_open:
                self._check_gate()
            if not self._gate_open:
                phase, k = WAITING, n
            else:
                phase = OPEN
                if measured:
                    self._select()
                    self._next_probe = t - 1 + self.probe_every
                k = n if self._next_probe is None or t >= self._next_probe else self._selected
        self._phase = phase
        self._set_active(k)

    def _check_gate(self) -> None:
        if self.stable_window is None:
            self._gate_open = True
            return
        self._stable = loss_stability(_to_host(self._loss_hist), self.stable_window)
        rel, cv = self._stable
        if rel <= self.stable_rel_change and cv <= self.stable_cv:
            self._gate_open = True
            self._gate_note = (f"; loss stable over {self.stable_window} steps (mean change "
                               f"{rel:.3g} <= {self.stable_rel_change:g}, cv {cv:.3g} <= "
                               f"{self.stable_cv:g})")
            self._loss_hist.clear()

    def _select(self) -> None:
        """Choose the suffix from the relevance EMA after a full step (one host read)."""
        n = self.num_blocks
        if self._selections > 0:
            self._adapt_budget()
        self._interval_sum, self._interval_count = 0.0, 0
        k = select_suffix(self._ema.tolist(), self.threshold, 1, n)
        self._selected = min(max(k + self._budget, self.min_active), self.max_active)
        self._selections += 1

    def _adapt_budget(self) -> None:
        """Grow the suffix when the probe interval's mean loss rises past ``grow_above`` x
        its EMA, shrink it when it falls under ``shrink_below`` x the EMA."""
        if self._interval_count == 0:
            return
        mean = _to_host([self._interval_sum])[0] / self._interval_count
        if not math.isfinite(mean):
            self._budget = min(self._budget + 1, self._budget_hi)
            return
        if self._loss_ema is not None:
            if mean > self.grow_above * self._loss_ema:
                self._budget = min(self._budget + 1, self._budget_hi)
            elif mean < self.shrink_below * self._loss_ema:
                self._budget = max(self._budget - 1, self._budget_lo)
            self._loss_ema = self.budget_beta * self._loss_ema + (1 - self.budget_beta) * mean
        else:
            self._loss_ema = mean

    def _set_active(self, k: int) -> None:
        self._active = k
        if k == self._applied:
            return
        cut = self.num_blocks - k
        for i, ps in enumerate(self._blocks):
            flag = i >= cut
            for p in ps:
                p.requires_grad_(flag)
        self._applied = k

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus the schedule under ``"block_schedule"``
        (the wrapper's own state-dict hooks run around it, as torch's would)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self.optimizer.state_dict()
        sd[_STATE_KEY] = {
            "num_blocks": self.num_blocks,
            "t": self._t,
            "ema": self._ema.detach().cpu().clone(),
            "active": self._active,
            "phase": self._phase,
            "gate_open": self._gate_open,
            "gate_note": self._gate_note,
            "announced": self._announced,
            "selected": self._selected,
            "selections": self._selections,
            "next_probe": self._next_probe,
            "budget": self._budget,
            "loss_ema": self._loss_ema,
            "interval_sum": _to_host([self._interval_sum])[0],
            "interval_count": self._interval_count,
            "stable": self._stable,
            "loss_hist": _to_host(self._loss_hist),
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            out = post_hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the wrapped optimizer and, when present, the schedule (``requires_grad``
        of the blocks follows the restored plan)."""
        sd = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = pre_hook(self, sd)
            if out is not None:
                sd = out
        sched = sd.pop(_STATE_KEY, None)
        if sched is not None and sched.get("num_blocks") != self.num_blocks:
            raise ValueError(f"state_dict is for {sched.get('num_blocks')} blocks, this "
                             f"schedule has {self.num_blocks}")
        self.optimizer.load_state_dict(sd)
        if sched is not None:
            self._load_schedule(sched)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_schedule(self, sched: dict[str, Any]) -> None:
        self._t = int(sched["t"])
        self._ema = sched["ema"].to(device=self._device, dtype=torch.float32).clone()
        self._phase = sched["phase"]
        self._gate_open = bool(sched["gate_open"])
        self._gate_note = sched["gate_note"]
        self._announced = sched["announced"]
        self._selected = int(sched["selected"])
        self._selections = int(sched["selections"])
        self._next_probe = sched["next_probe"]
        self._budget = int(sched["budget"])
        self._loss_ema = sched["loss_ema"]
        self._interval_sum = float(sched["interval_sum"])
        self._interval_count = int(sched["interval_count"])
        self._stable = tuple(sched["stable"])
        self._loss_hist.clear()
        self._loss_hist.extend(float(v) for v in sched["loss_hist"])
        self._set_active(int(sched["active"]))

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles only defaults/state/param_groups: keep the whole schedule
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        return (f"BlockSchedule({type(self.optimizer).__name__}, blocks={self.num_blocks}, "
                f"active={self._active}, phase={self._phase})")
