"""``Falcon``: AdamW whose conv-weight gradients first go through FALCON's frequency filter.

Per step and filtered conv weight: rfft2 -> energy mask (cached, rebuilt every
``mask_interval`` steps) -> rank-k per kept bin -> irfft2 -> skip-mix with the raw gradient;
then every parameter takes a foreach AdamW step with decoupled weight decay (not on biases
and norm weights). ``retain_energy`` and ``skip_mix`` may run linearly from a start to an end
value over ``total_steps``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch

import hooks
from optimizers.adamw_step import adamw_update
from optimizers.diagnostics_guard import DiagnosticGuard
from optimizers.falcon import (
    STAT_TOPICS,
    _filter,
    _is_int,
    _is_real,
    check_lowrank,
    check_retain_energy,
    check_skip_mix,
    mask_shape,
)
from optimizers.muon import MAX_SCALAR

Schedule = float | tuple[float, float]
ApplyTo = Callable[[str], bool] | Iterable[int] | None


def _pair(value: Any, name: str, check: Callable[[object, str], None]) -> tuple[float, float]:
    """A float or (start, end) as a checked (start, end) pair."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a number or a (start, end) pair, got {value!r}")
        check(value[0], f"{name} start")
        check(value[1], f"{name} end")
        return float(value[0]), float(value[1])
    check(value, name)
    return float(value), float(value)


def scheduled(pair: tuple[float, float], step: int, total_steps: int | None) -> float:
    """The value of a (start, end) schedule at ``step``: linear over ``total_steps``, then
    held at ``end``; held at ``start`` when no ``total_steps`` is known."""
    start, end = pair
    if start == end or total_steps is None:
        return start
    t = min(step / max(total_steps - 1, 1), 1.0)
    return start + (end - start) * t


def _check_group(group: dict) -> None:
    """Validate a param group's options in place (schedules become (start, end) pairs)."""
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    # past MAX_SCALAR, lr * wd, Adam's step size or eps overflow float32 when torch converts
    # them for a foreach op: a RuntimeError in step(), so they are refused here
    if not (_is_real(lr) and 0 <= lr <= MAX_SCALAR):
        raise ValueError(f"lr must be a number >= 0 and <= {MAX_SCALAR:g}, got {lr!r}")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(_is_real(b) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
    if not (_is_real(eps) and 0 <= eps <= MAX_SCALAR):
        raise ValueError(f"eps must be a number >= 0 and <= {MAX_SCALAR:g}, got {eps!r}")
    if not (_is_real(wd) and 0 <= wd <= MAX_SCALAR):
        raise ValueError(f"weight_decay must be a number >= 0 and <= {MAX_SCALAR:g}, "
                         f"got {wd!r}")
    group["retain_energy"] = _pair(group["retain_energy"], "retain_energy", check_retain_energy)
    group["skip_mix"] = _pair(group["skip_mix"], "skip_mix", check_skip_mix)
    check_lowrank(group["rank_k"], group["backend"], group["poweriter_steps"])
    mi = group["mask_interval"]
    if not (_is_int(mi) and mi >= 1):
        raise ValueError(f"mask_interval must be an int >= 1, got {mi!r}")
    if not isinstance(group["fast_mask"], bool):
        raise ValueError(f"fast_mask must be True or False, got {group['fast_mask']!r}")


class _Info:
    """What the step needs to know about one parameter, worked out once."""

    __slots__ = ("name", "tags", "filtered", "decay", "mask_shape", "rebuilds")

    def __init__(self, name: str, filtered: bool, decay: bool, shape: torch.Size) -> None:
        self.rebuilds = 0  # mask rebuilds since falcon/mask_recomputed was last emitted
        self.name = name
        self.tags = {"param": name}
        self.filtered = filtered
        self.decay = decay
        self.mask_shape = mask_shape(tuple(shape[-2:])) if len(shape) == 4 else None


def _restore_masks(optimizer: torch.optim.Optimizer) -> None:
    # load_state_dict casts every tensor to its parameter's float dtype; masks are bool
    for st in optimizer.state.values():
        mask = st.get("mask")
        if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
            st["mask"] = mask != 0


class Falcon(torch.optim.Optimizer):
    """FALCON v2: AdamW on frequency-filtered conv-weight gradients, reporting every stage.

    ``apply_to`` picks the filtered conv weights (4-d, both kernel sides >= ``min_kernel``):
    None for all, a predicate on the parameter name, or indices into the filterable conv
    weights in parameter order. ``retain_energy`` and ``skip_mix`` take a float or a
    (start, end) pair run linearly over ``total_steps``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 5e-4, retain_energy: Schedule = (0.90, 0.60),
                 skip_mix: Schedule = (0.0, 0.7), rank_k: int = 1, backend: str = "poweriter",
                 poweriter_steps: int = 1, mask_interval: int = 5, fast_mask: bool = False,
                 min_kernel: int = 3, apply_to: ApplyTo = None, total_steps: int | None = None,
                 bus: hooks.Bus | None = None) -> None:
        if not (_is_int(min_kernel) and min_kernel >= 1):
            raise ValueError(f"min_kernel must be an int >= 1, got {min_kernel!r}")
        if total_steps is not None and not (_is_int(total_steps) and total_steps >= 1):
            raise ValueError(f"total_steps must be None or an int >= 1, got {total_steps!r}")
        if apply_to is not None and not callable(apply_to):
            if isinstance(apply_to, (str, bytes)) or not isinstance(apply_to, Iterable):
                raise ValueError(f"apply_to must be None, a predicate on the parameter name or "
                                 f"an iterable of conv-weight indices, got {apply_to!r}")
            try:  # a 0-d tensor is an Iterable that cannot be iterated
                apply_to = tuple(apply_to)
            except TypeError:
                raise ValueError(f"apply_to must be None, a predicate on the parameter name "
                                 f"or an iterable of conv-weight indices, got {apply_to!r}") \
                    from None
            if not all(_is_int(i) for i in apply_to):
                raise ValueError(f"apply_to indices must be ints, got {apply_to!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        retain_energy=retain_energy, skip_mix=skip_mix, rank_k=rank_k,
                        backend=backend, poweriter_steps=poweriter_steps,
                        mask_interval=mask_interval, fast_mask=fast_mask)
        _check_group(defaults)
        self.bus = hooks.resolve_bus(bus)
        self.min_kernel = min_kernel
        self.apply_to = apply_to
        self.total_steps = total_steps
        self._info: dict[torch.Tensor, _Info] = {}
        self._planned = False
        self._guard = DiagnosticGuard("Falcon")
        self.svd_fallbacks = 0  # steps where backend="svd" failed and power iteration ran
        super().__init__(params, defaults)
        self._plan()
        self._planned = True
        self.register_load_state_dict_post_hook(_restore_masks)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (its Falcon options are validated; a bad one is not added)."""
        if isinstance(param_group, dict) and "params" not in param_group:
            raise ValueError(f"param_group must have a 'params' entry (the tensors to "
                             f"optimize), got keys {sorted(map(str, param_group))}")
        super().add_param_group(param_group)
        try:
            if not self.param_groups[-1]["params"]:
                raise ValueError("optimizer got an empty parameter group (params=[])")
            _check_group(self.param_groups[-1])
            if self._planned:
                self._plan()
        except ValueError:
            self.param_groups.pop()
            raise

    def _plan(self) -> None:
        """Name every parameter and decide which are filtered and which are decayed."""
        old = self._info
        info: dict[torch.Tensor, _Info] = {}
        filterable: list[tuple[torch.Tensor, str]] = []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if not p.is_floating_point():
                    raise ValueError(f"Falcon supports real floating-point parameters; "
                                     f"parameter {i} of group {gi} has dtype {p.dtype}")
                name = names[i] if names else f"group{gi}.{i}"
                # a 0-size weight has no spectrum to filter (and no update either)
                if p.ndim == 4 and min(p.shape[-2:]) >= self.min_kernel and p.numel():
                    filterable.append((p, name))
                # biases and norm weights are the 0-d and 1-d parameters: no decay for them
                info[p] = _Info(name, False, p.ndim >= 2, p.shape)
                if p in old:  # a re-plan keeps the rebuilds not yet reported
                    info[p].rebuilds = old[p].rebuilds
        for p in self._chosen(filterable):
            info[p].filtered = True
        self._info = info

    def _chosen(self, filterable: list[tuple[torch.Tensor, str]]) -> list[torch.Tensor]:
        sel = self.apply_to
        if sel is None:
            return [p for p, _ in filterable]
        if callable(sel):
            return [p for p, name in filterable if sel(name)]
        n = len(filterable)
        for i in sel:
            if not -n <= i < n:
                raise ValueError(f"apply_to index {i} is out of range [{-n}, {n}) for the {n} "
                                 f"filterable conv weights (4-d, kernel >= {self.min_kernel})")
        return [filterable[i][0] for i in sorted({i % n for i in sel})]

    @property
    def filtered_names(self) -> list[str]:
        """Names of the parameters whose gradients are filtered, in parameter order."""
        return [i.name for i in self._info.values() if i.filtered]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Filter the chosen conv gradients, then take one AdamW step on every parameter."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        bus = self.bus
        want_stats = any(bus.wants(t) for t in STAT_TOPICS.values())
        want_recomputed = bus.wants("falcon/mask_recomputed")
        seen = filtered = 0
        schedule = None
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps, decay = [], [], [], [], [], []
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("Falcon does not support sparse gradients")
                info = self._info.get(p)
                if info is None:  # a group mutated behind add_param_group's back
                    self._plan()
                    info = self._info[p]
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                seen += 1
                if info.filtered:
                    filtered += 1
                    t = st["step"]
                    retain = scheduled(group["retain_energy"], t, self.total_steps)
                    mix = scheduled(group["skip_mix"], t, self.total_steps)
                    if schedule is None:
                        schedule = (retain, mix)
                    mask = st.get("mask")
                    recompute = (mask is None or t % group["mask_interval"] == 0
                                 or tuple(mask.shape) != info.mask_shape)
                    res = _filter(grad, retain, group["rank_k"], group["backend"],
                                  group["poweriter_steps"], mix, None if recompute else mask,
                                  group["fast_mask"], want_stats, bus, info.tags)
                    st["mask"] = res.mask
                    if res.svd_failed:
                        self._svd_failed(bus, info.name)
                    if res.stats_error is not None:
                        self._guard.failed(bus, "falcon/filter_stats", res.stats_error)
                    if want_stats:
                        for key, topic in STAT_TOPICS.items():
                            bus.emit(topic, res.stats[key], **info.tags)
                    # counted on every step, so a sampled value covers the steps between
                    # two samples: with every=10 and mask_interval=5 it reads 2, not 1 or 0
                    info.rebuilds += recompute
                    if want_recomputed:
                        bus.emit("falcon/mask_recomputed", float(info.rebuilds), **info.tags)
                        info.rebuilds = 0
                    grad = res.grad
                st["step"] += 1
                params.append(p)
                grads.append(grad)
                exp_avgs.append(st["exp_avg"])
                exp_avg_sqs.append(st["exp_avg_sq"])
                steps.append(st["step"])
                decay.append(info.decay)
            if params:
                beta1, beta2 = group["betas"]
                with bus.span("falcon/adamw", device=params[0].device):
                    adamw_update(params, grads, exp_avgs, exp_avg_sqs, steps, decay,
                                 lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                 weight_decay=group["weight_decay"])
        if seen and bus.wants("falcon/filtered_fraction"):
            bus.emit("falcon/filtered_fraction", filtered / seen)
        if schedule is not None:
            if bus.wants("falcon/retain_target"):
                bus.emit("falcon/retain_target", schedule[0])
            if bus.wants("falcon/skip_mix"):
                bus.emit("falcon/skip_mix", schedule[1])
        return loss

    def _svd_failed(self, bus: hooks.Bus, name: str) -> None:
        """Count an svd failure (power iteration stood in), report it once, emit the total."""
        self.svd_fallbacks += 1
        if self.svd_fallbacks == 1:
            print(f"optprobe: Falcon's svd failed on {name} (a non-finite gradient?); power "
                  f"iteration stood in, further fallbacks are counted in falcon/svd_fallbacks",
                  file=sys.stderr)
        if bus.wants("falcon/svd_fallbacks"):
            bus.emit("falcon/svd_fallbacks", float(self.svd_fallbacks))


__all__ = ["Falcon", "scheduled"]
