"""Muon: momentum orthogonalized by Newton-Schulz, with routing, shape batching and telemetry.

Momentum and Nesterov follow ``torch.optim.Muon`` (EMA form: ``buf.lerp_(g, 1 - mu)``, update
``g.lerp(buf, mu)``), so on 2-D parameters with the same settings the updates are the same.
Parameters Newton-Schulz should not see (vectors, scalars, very skinny or marked matrices)
go to an AdamW fallback. Each parameter group the user gives becomes up to two groups, one
per route (``group["route"]``), so LR schedulers scale both learning rates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

import hooks
from optimizers import muon_routing as routing
from optimizers.diagnostics_guard import DiagnosticGuard
from optimizers.muon_fallback import adamw_step
from optimizers.newton_schulz import (
    DEFAULT_COEFFICIENTS,
    EPS,
    check_ns_args,
    newton_schulz,
    ns_diagnostics,
    ns_dtype_name,
    resolve_ns_dtype,
)

ADJUST_LR = (None, "original", "match_rms_adamw")
# normalize_weights: False, or when W <- W sqrt(rows)/||W|| runs: "before" the update (True,
# airbench94_muon's order: the next gradient is taken at the updated, unnormalized weight)
# or "after" it
NORMALIZE = (False, True, "before", "after")
_NEEDS_GRAM = ("muon/ns_residual", "muon/sv_min", "muon/sv_max")
DEFAULT_LR_FALLBACK = 3e-4  # the AdamW lr of Keller Jordan's MuonWithAuxAdam
# lr, decays and eps above this would make lr*wd, the shape-adjusted lr or Adam's step size
# overflow float32 when torch converts them for an in-place op (a RuntimeError in step())
MAX_SCALAR = 1e18


def adjusted_lr(lr: float, adjust_lr: str | None, rows: int, cols: int) -> float:
    """The learning rate for a ``rows x cols`` update: ``None``/``"original"`` scale by
    sqrt(max(1, rows/cols)), ``"match_rms_adamw"`` by 0.2 sqrt(max(rows, cols))."""
    if adjust_lr == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1.0, rows / cols))


def real_in(name: str, value: Any, lo: float, hi: float = math.inf, lo_open: bool = False,
          hi_open: bool = False) -> float:
    """``value`` as a float when it is a finite real in the given interval, else a
    ValueError naming ``name``; inf is never accepted."""
    lb, rb = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
    allowed = f"a finite float in {lb}{lo:g}, {hi:g}{rb}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    try:
        v = float(value)
    except OverflowError:  # an int past float64 (10**400)
        v = math.inf
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) \
        and (v < hi if hi_open else v <= hi)
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return v


def _check_group(g: dict) -> None:
    """ValueError naming the option when a group's setting is out of range."""
    real_in("lr", g["lr"], 0.0, MAX_SCALAR)
    real_in("momentum", g["momentum"], 0.0, 1.0, hi_open=True)
    real_in("weight_decay", g["weight_decay"], 0.0, MAX_SCALAR)
    if not isinstance(g["nesterov"], bool):
        raise ValueError(f"nesterov must be True or False, got {g['nesterov']!r}")
    try:
        check_ns_args(g["ns_steps"], g["ns_coefficients"], g["ns_tol"])
    except ValueError as exc:  # name the optimizer's arguments, not orthogonalize's
        msg = str(exc)
        for a, b in (("steps", "ns_steps"), ("coefficients", "ns_coefficients"),
                     ("tol", "ns_tol")):
            if msg.startswith(a + " "):
                msg = b + msg[len(a):]
        raise ValueError(msg) from None
    try:
        ns_dtype_name(g["ns_dtype"])
    except ValueError as exc:
        raise ValueError("ns_" + str(exc)) from None
    if not (g["adjust_lr"] is None or isinstance(g["adjust_lr"], str)
            and g["adjust_lr"] in ADJUST_LR):
        raise ValueError(f"adjust_lr must be None, 'original' or 'match_rms_adamw', "
                         f"got {g['adjust_lr']!r}")
    nw = g["normalize_weights"]
    if not (nw is True or nw is False or (isinstance(nw, str) and nw in NORMALIZE)):
        raise ValueError(f"normalize_weights must be False, True (= 'before', AirBench's "
                         f"order) or 'after', got {g['normalize_weights']!r}")
    if g["lr_fallback"] is not None:
        real_in("lr_fallback", g["lr_fallback"], 0.0, MAX_SCALAR)
    if g["wd_fallback"] is not None:
        real_in("wd_fallback", g["wd_fallback"], 0.0, MAX_SCALAR)
    betas = g["betas_fallback"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas_fallback must be a pair of floats in [0, 1), got {betas!r}")
    for i, b in enumerate(betas):
        real_in(f"betas_fallback[{i}]", b, 0.0, 1.0, hi_open=True)
    real_in("eps_fallback", g["eps_fallback"], 0.0, MAX_SCALAR, lo_open=True)
    if not (g["use_muon"] is None or isinstance(g["use_muon"], bool)):
        raise ValueError(f"use_muon must be None, True or False, got {g['use_muon']!r}")
    routing.check_routing_args(g["min_dim"], g["max_aspect"])


def _normalize_mode(value: bool | str) -> str | None:
    """None, "before" or "after" for a ``normalize_weights`` setting."""
    if value is False:
        return None
    return "before" if value is True else value


class _Item:
    """One Muon parameter's work for this step."""

    __slots__ = ("p", "u", "name", "lr", "lr_adj", "wd", "normalize")

    def __init__(self, p, u, name, lr, lr_adj, wd, normalize):
        self.p, self.u, self.name, self.lr = p, u, name, lr
        self.lr_adj, self.wd, self.normalize = lr_adj, wd, normalize


class Muon(torch.optim.Optimizer):
    """Muon with Newton-Schulz telemetry, routing to an AdamW fallback and shape batching.

    Options beyond ``torch.optim.Muon``: ``ns_dtype`` ("auto": bf16 on CUDA, fp32 on CPU),
    ``ns_tol`` (early stop), ``normalize_weights`` (AirBench: rescale each weight to norm
    sqrt(rows) before its update; ``"after"``: after it), routing (``min_dim``,
    ``max_aspect``, group key ``use_muon``), the fallback's ``lr_fallback``/``wd_fallback``/
    ``betas_fallback``/``eps_fallback`` and ``batch_shapes`` (orthogonalize same-shaped
    parameters together).
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, weight_decay: float = 0.0, ns_steps: int = 5,
                 ns_coefficients: tuple[float, float, float] = DEFAULT_COEFFICIENTS,
                 ns_dtype: str | torch.dtype = "auto", ns_tol: float | None = None,
                 adjust_lr: str | None = None, normalize_weights: bool | str = False,
                 fallback: str | None = "adamw", lr_fallback: float | None = None,
                 wd_fallback: float | None = None,
                 betas_fallback: tuple[float, float] = (0.9, 0.95),
                 min_dim: int = 2, max_aspect: float = 32.0, bus: hooks.Bus | None = None,
                 eps_fallback: float = 1e-8, batch_shapes: bool = True) -> None:
        if not (fallback is None or isinstance(fallback, str) and fallback == "adamw"):
            raise ValueError(f"fallback must be 'adamw' or None (no fallback: every parameter "
                             f"must be a matrix Newton-Schulz can take), got {fallback!r}")
        if not isinstance(batch_shapes, bool):
            raise ValueError(f"batch_shapes must be True or False, got {batch_shapes!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, ns_coefficients=ns_coefficients,
                        ns_dtype=ns_dtype, ns_tol=ns_tol, adjust_lr=adjust_lr,
                        normalize_weights=normalize_weights, lr_fallback=lr_fallback,
                        wd_fallback=wd_fallback, betas_fallback=betas_fallback,
                        eps_fallback=eps_fallback, min_dim=min_dim, max_aspect=max_aspect,
                        use_muon=None)
        _check_group(defaults)
        defaults["ns_dtype"] = ns_dtype_name(ns_dtype)
        defaults["ns_coefficients"] = tuple(float(x) for x in ns_coefficients)
        defaults["betas_fallback"] = tuple(float(x) for x in betas_fallback)
        self.bus = hooks.resolve_bus(bus)
        self.fallback = fallback
        self.batch_shapes = batch_shapes
        self.routes: list[routing.Route] = []
        self._names: dict[int, str] = {}
        self._user_groups = 0
        self._routing_emitted = False
        self._guard = DiagnosticGuard("Muon")
        super().__init__(params, defaults)

    # -- groups and routing --------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate the group, route each parameter and add one group per route."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        if "params" not in param_group:
            raise ValueError(f"param_group must have a 'params' entry (the tensors to "
                             f"optimize), got keys {sorted(map(str, param_group))}")
        group = dict(param_group)
        params = group.pop("params")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        route = group.pop("route", None)
        if route is not None:  # a group taken from another Muon's param_groups
            if route not in (routing.MUON, routing.FALLBACK):
                raise ValueError(f"route must be 'muon' or 'adamw', got {route!r}")
            group.setdefault("use_muon", route == routing.MUON)
        names = group.pop("param_names", None)
        if names is not None and len(names) == len(params) \
                and not any(isinstance(p, tuple) for p in params):
            params = list(zip(names, params))
        opts = {**self.defaults, **group}
        _check_group(opts)
        opts["ns_dtype"] = ns_dtype_name(opts["ns_dtype"])
        g = self._user_groups
        named = any(isinstance(p, tuple) for p in params)
        entries = []
        for i, p in enumerate(params):
            name, t = (p if isinstance(p, tuple) else (f"group{g}.{i}", p))
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but {name} is "
                                f"{torch.typename(t)}")
            if not t.is_floating_point():  # an integer tensor can never get a gradient
                raise ValueError(f"params must be real floating-point tensors: {name} has "
                                 f"dtype {t.dtype}")
            r = routing.decide(name, t, opts["use_muon"], opts["min_dim"], opts["max_aspect"])
            if r.route == routing.FALLBACK and self.fallback is None:
                raise ValueError(f"fallback=None but {name} cannot go to Newton-Schulz "
                                 f"({r.reason}); use fallback='adamw'")
            entries.append(((name, t) if named else t, r))
        muon = [e for e, r in entries if r.route == routing.MUON]
        rest = [e for e, r in entries if r.route == routing.FALLBACK]
        if not entries:
            raise ValueError("optimizer got an empty parameter group")
        added = []
        if muon or not rest:
            added.append({**opts, "params": muon, "route": routing.MUON})
        if rest:
            lr_fb = opts["lr_fallback"]
            if lr_fb is None:
                lr_fb = opts["lr"] if opts["adjust_lr"] == "match_rms_adamw" \
                    else DEFAULT_LR_FALLBACK
            wd_fb = opts["wd_fallback"]
            added.append({**opts, "params": rest, "route": routing.FALLBACK, "lr": lr_fb,
                          "weight_decay": opts["weight_decay"] if wd_fb is None else wd_fb})
        for sub in added:
            if sub["params"]:
                super().add_param_group(sub)
        for e, r in entries:
            self._names[id(e[1] if named else e)] = r.name
            self.routes.append(r)
        self._user_groups += 1
        self._routing_emitted = False

    def routing_table(self) -> str:
        """The routing decisions as a text table (what ``muon/routing`` carries)."""
        return routing.table(self.routes)

    # -- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step: Muon on the matrices (bucketed by shape), AdamW on the rest."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not any(p.grad is not None for g in self.param_groups for p in g["params"]):
            return loss  # nothing to step (a skipped step): no state, no telemetry changes
        bus = self.bus
        if not self._routing_emitted and bus.wants("muon/routing"):
            bus.emit("muon/routing", self.routing_table())
            self._routing_emitted = True
        buckets = self._momentum_and_buckets()
        if buckets:
            first = next(iter(buckets.values()))[0].p
            with bus.span("muon/newton_schulz", device=first.device):
                diag = bus.sampled and any(bus.wants(t) for t in _NEEDS_GRAM)
                done = [(items, *self._orthogonalize_bucket(key, items, diag))
                        for key, items in buckets.items()]
            if bus.sampled:  # outside the span: time/muon/newton_schulz is NS alone
                for items, X, iters, gram in done:
                    self._guard.run(bus, "muon/ns_telemetry", self._bucket_telemetry, bus,
                                    items, X, iters, gram)
        fallback = [g for g in self.param_groups if g["route"] == routing.FALLBACK
                    and any(p.grad is not None for p in g["params"])]
        if fallback:
            with bus.span("muon/fallback", device=fallback[0]["params"][0].device):
                for group in fallback:
                    self._fallback_group(group, bus)
        return loss

    def _momentum_and_buckets(self) -> dict[tuple, list[_Item]]:
        """Update the momentum buffers and group the Nesterov updates by NS shape/settings."""
        buckets: dict[tuple, list[_Item]] = {}
        for group in self.param_groups:
            if group["route"] != routing.MUON:
                continue
            params, grads, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"Muon does not take sparse gradients "
                                     f"({self._names[id(p)]})")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        p.grad, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                bufs.append(state["momentum_buffer"])
            if not params:
                continue
            mu = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1.0 - mu)
            updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
            settings = (group["ns_steps"], tuple(group["ns_coefficients"]), group["ns_tol"])
            for p, u in zip(params, updates):
                rows = p.shape[0]
                cols = p.numel() // rows
                work = resolve_ns_dtype(group["ns_dtype"], p.device)
                key = (min(rows, cols), max(rows, cols), u.dtype, p.device, work, settings)
                if not self.batch_shapes:
                    key = key + (id(p),)
                lr = group["lr"]
                buckets.setdefault(key, []).append(_Item(
                    p, u.reshape(rows, cols), self._names[id(p)], lr,
                    adjusted_lr(lr, group["adjust_lr"], rows, cols), group["weight_decay"],
                    _normalize_mode(group["normalize_weights"])))
        return buckets

    def _orthogonalize_bucket(self, key: tuple, items: list[_Item], gram: bool
                              ) -> tuple[torch.Tensor, int | torch.Tensor, torch.Tensor | None]:
        """Orthogonalize a bucket's updates in one call and apply them; returns the NS
        output (``[B, m, n]``), the iterations each matrix ran and, when ``gram``, the
        output's Gram matrix for the diagnostics."""
        work, (steps, (a, b, c), tol) = key[4], key[5]
        if len(items) == 1:  # one matrix: the exact operations of torch.optim.Muon
            X, iters, G = newton_schulz(items[0].u.to(work), steps, a, b, c, tol, gram)
            outs = [X]
            X = X.unsqueeze(0)
            G = None if G is None else G.unsqueeze(0)
        else:
            tall = [it.u.shape[0] > it.u.shape[1] for it in items]
            G = torch.stack([it.u.mT if t else it.u for it, t in zip(items, tall)])
            X, iters, G = newton_schulz(G.to(work), steps, a, b, c, tol, gram)
            outs = [o.mT if t else o for o, t in zip(X.unbind(0), tall)]
        # the NS output stays in the working dtype: add_ promotes it exactly, as torch does
        for it, o in zip(items, outs):
            p = it.p
            if it.normalize == "before":
                p.mul_(math.sqrt(p.shape[0]) / p.norm().clamp_min(EPS))
            if it.wd != 0.0:
                p.mul_(1.0 - it.lr * it.wd)
            p.add_(o.reshape(p.shape), alpha=-it.lr_adj)
            if it.normalize == "after":
                p.mul_(math.sqrt(p.shape[0]) / p.norm().clamp_min(EPS))
        return X, iters, G

    def _bucket_telemetry(self, bus: hooks.Bus, items: list[_Item], X: torch.Tensor,
                          iters: int | torch.Tensor, gram: torch.Tensor | None) -> None:
        """Per-parameter NS figures, one batched computation per bucket, kept on device."""
        want_res = bus.wants("muon/ns_residual")
        want_lo, want_hi = bus.wants("muon/sv_min"), bus.wants("muon/sv_max")
        want_rms, want_it = bus.wants("muon/update_rms"), bus.wants("muon/ns_iters")
        if not (want_res or want_lo or want_hi or want_rms or want_it):
            return
        tags = [{"param": it.name} for it in items]
        if want_it:
            if isinstance(iters, int):
                iters = torch.full((len(items),), iters, dtype=torch.int64)
            bus.emit_each("muon/ns_iters", iters.reshape(-1).float(), tags)
        fro = None
        if want_res or want_lo or want_hi:
            # the update's RMS comes from the same Gram matrix: ||X||_F^2 = trace(X X^T)
            d = ns_diagnostics(X, residual=want_res, singular_values=want_lo or want_hi,
                               frobenius=want_rms, gram=gram)
            fro = d.frobenius
            if want_res:
                bus.emit_each("muon/ns_residual", d.residual, tags)
            if want_lo:
                bus.emit_each("muon/sv_min", d.sv_min, tags)
            if want_hi:
                bus.emit_each("muon/sv_max", d.sv_max, tags)
        if want_rms:
            m, n = X.shape[-2:]
            if fro is None:
                fro = torch.linalg.vector_norm(X.float(), dim=(-2, -1))
            rms = fro / math.sqrt(m * n)
            scales = {it.lr_adj for it in items}
            if len(scales) == 1:
                rms = rms * scales.pop()
            else:
                rms = torch.stack([r * it.lr_adj for r, it in zip(rms.unbind(0), items)])
            bus.emit_each("muon/update_rms", rms, tags)

    def _fallback_group(self, group: dict, bus: hooks.Bus) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(f"Muon's AdamW fallback does not take sparse gradients "
                                 f"({self._names[id(p)]})")
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas_fallback"]
        want_rms = bus.wants("muon/update_rms")
        rms = adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr=group["lr"],
                         beta1=beta1, beta2=beta2, eps=group["eps_fallback"],
                         weight_decay=group["weight_decay"], want_rms=want_rms)
        if want_rms:
            self._guard.run(bus, "muon/update_rms", self._emit_fallback_rms, bus, params, rms)

    def _emit_fallback_rms(self, bus: hooks.Bus, params: list[torch.Tensor],
                           rms: list[torch.Tensor]) -> None:
        for p, r in zip(params, rms):
            bus.emit("muon/update_rms", r, param=self._names[id(p)])
