"""K-FAC: Kronecker-factored natural gradient for ``nn.Linear`` and ``nn.Conv2d`` layers,
reporting how well conditioned its curvature is and what it did to stay stable.

Every ``factor_every`` steps (training mode only) module hooks collect ``A = E[a aᵀ]`` and
``G = E[g gᵀ]`` into running averages; every ``inverse_every`` steps each layer's factors are
inverted, by eigendecomposition (``eig``) or, for a G side backed by few rows ``T``, through a
``T x T`` matrix (``woodbury``: G's eigenpairs from the Gram, the eig path's exact step; or,
with ``woodbury_damping="factored"``, the Woodbury identity with the damping split between
the factors). ``A`` averages over rows, ``G`` sums over each sample's rows (KFAC-expand).
Each step preconditions the layers'
gradients, clips the step's KL (``kl_clip``) and applies SGD with momentum and decoupled
weight decay; other parameters (and layers in ``skip``) get that SGD on their raw gradient.
Under torch.distributed the factors (and the Woodbury rows, hence their Gram) are combined
over ranks, so N ranks with batch B precondition like one rank with batch N·B.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

import hooks
from optimizers import kfac_dist
from optimizers.kfac_layers import KFACLayer, grad_columns, input_covariance, unsupported_reason
from optimizers.kfac_math import (
    damped_condition,
    factored_damping,
    lowrank_natural_gradient,
    natural_gradient,
    woodbury_natural_gradient,
)
from optimizers.linalg import clipped_eigh
from optimizers.muon import MAX_SCALAR, real_in
from optimizers.woodbury import STORE_DTYPES, LowRankEig, WoodburyInverse

__all__ = ["KFAC", "choose_policy", "lowrank_natural_gradient", "natural_gradient",
           "woodbury_natural_gradient"]

POLICIES = ("eig", "woodbury", "auto")
STORES = ("auto", "device", "cpu")
WOODBURY_DAMPINGS = ("exact", "factored")
#: what the kfac/policy text says about a Woodbury layer's damping
DAMPING_NOTE = {
    "exact": "exact damping (the eig path's step, G's eigenpairs from the T x T Gram)",
    "factored": "factored damping (d_A = pi*sqrt(d), d_G = sqrt(d)/pi: not the eig path's "
                "Tikhonov step, 29-61% from it at batch 16 in docs/kfac.md)",
}


def choose_policy(policy: str, tokens: int, out_dim: int, rho: float, t_max: int
                  ) -> tuple[str, str]:
    """``(eig | woodbury, reason)`` for a G factor behind ``tokens`` rows of width ``out_dim``."""
    if policy == "eig":
        return "eig", "policy=eig"
    if policy == "woodbury":
        return "woodbury", "policy=woodbury"
    if tokens > rho * out_dim:
        return "eig", f"T={tokens} > auto_rho*out={rho:g}*{out_dim}"
    if tokens > t_max:
        return "eig", f"T={tokens} > auto_t_max={t_max}"
    return "woodbury", f"T={tokens} <= auto_rho*out={rho:g}*{out_dim} and <= auto_t_max={t_max}"


def _number(name: str, value: Any, lo: float, hi: float = MAX_SCALAR, lo_open: bool = False,
            hi_open: bool = False, none_ok: bool = False) -> float | None:
    """``value`` as a float when it is a finite real in the interval (Muon's check), or None
    when allowed."""
    if value is None and none_ok:
        return None
    return real_in(name, value, lo, hi, lo_open=lo_open, hi_open=hi_open)


def _choice(name: str, value: Any, allowed) -> None:
    # the type first: ``in`` on a numpy array or tensor raises an error that names nothing
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _integer(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


class KFAC(torch.optim.Optimizer):
    """Kronecker-factored natural gradient for the ``nn.Linear``/``nn.Conv2d`` layers of
    ``model`` (see the module docstring); ``bus`` receives its ``kfac/*`` telemetry."""

    #: byte budget for Woodbury factors kept on the device when ``woodbury_store="auto"``
    woodbury_device_budget: int = 1 << 30

    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, damping: float = 1e-3, factor_decay: float = 0.95,
                 factor_every: int = 10, inverse_every: int = 100, kl_clip: float | None = 1e-3,
                 max_condition: float | None = 1e6, policy: str = "auto", auto_rho: float = 1.0,
                 auto_t_max: int = 8192, woodbury_store: str = "auto",
                 woodbury_dtype: torch.dtype = torch.float32,
                 woodbury_damping: str = "exact", skip: Iterable[Any] = (),
                 grad_scaler: torch.amp.GradScaler | None = None,
                 bus: hooks.Bus | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        # reals are kept as floats: an int lr of 10**10 would overflow int64 in lr * lr
        lr = _number("lr", lr, 0.0)
        momentum = _number("momentum", momentum, 0.0, 1.0, hi_open=True)
        weight_decay = _number("weight_decay", weight_decay, 0.0)
        damping = _number("damping", damping, 0.0, lo_open=True)
        factor_decay = _number("factor_decay", factor_decay, 0.0, 1.0, hi_open=True)
        _integer("factor_every", factor_every, 1)
        _integer("inverse_every", inverse_every, 1)
        kl_clip = _number("kl_clip", kl_clip, 0.0, lo_open=True, none_ok=True)
        max_condition = _number("max_condition", max_condition, 1.0, lo_open=True,
                                none_ok=True)
        _choice("policy", policy, POLICIES)
        auto_rho = _number("auto_rho", auto_rho, 0.0, lo_open=True)
        _integer("auto_t_max", auto_t_max, 1)
        _choice("woodbury_store", woodbury_store, STORES)
        _choice("woodbury_damping", woodbury_damping, WOODBURY_DAMPINGS)
        if not isinstance(woodbury_dtype, torch.dtype) or woodbury_dtype not in STORE_DTYPES:
            raise ValueError(f"woodbury_dtype must be one of torch.float32, torch.float16, "
                             f"torch.bfloat16, got {woodbury_dtype!r}")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise ValueError(f"grad_scaler must be a torch.amp.GradScaler or None, got "
                             f"{type(grad_scaler).__name__}")
        skipped = self._resolve_skip(model, skip)
        self.bus = hooks.resolve_bus(bus)

        self.layers: list[KFACLayer] = []
        self.excluded: dict[str, str] = {}  # layer name -> why it gets plain SGD
        claimed: dict[int, str] = {}
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            why = "in skip" if module in skipped else unsupported_reason(module)
            if why is None and id(module.weight) in claimed:
                why = f"weight shared with {claimed[id(module.weight)]}"
            if why is not None:
                self.excluded[name] = why
                continue
            claimed[id(module.weight)] = name
            # the model itself as the layer has no name: call it by its class
            self.layers.append(KFACLayer(name or type(module).__name__, module))
        if not self.layers:
            raise ValueError("model must contain at least one trainable nn.Linear or nn.Conv2d "
                             "layer outside skip (K-FAC would have nothing to precondition)")
        params = [p for p in model.parameters() if p.requires_grad]
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping)
        super().__init__(params, defaults)

        self.factor_decay = factor_decay
        self.factor_every = factor_every
        self.inverse_every = inverse_every
        self.kl_clip = kl_clip
        self.max_condition = max_condition
        self.policy = policy
        self.auto_rho = auto_rho
        self.auto_t_max = auto_t_max
        self.woodbury_store = woodbury_store
        self.woodbury_dtype = woodbury_dtype
        self.woodbury_damping = woodbury_damping
        #: the GradScaler whose scaled backward feeds the hooks (None: gradients unscaled)
        self.grad_scaler = grad_scaler
        self.steps = 0
        self._collected = False
        self._handles = [layer.module.register_forward_hook(self._forward_hook(layer))
                         for layer in self.layers]

    # -- setup ---------------------------------------------------------------------------
    @staticmethod
    def _resolve_skip(model: nn.Module, skip: Iterable[Any]) -> set[nn.Module]:
        if isinstance(skip, (str, nn.Module, torch.Tensor)) or not isinstance(skip, Iterable):
            raise ValueError(f"skip must be an iterable of module names, modules or module "
                             f"types, got {skip!r}")
        named = dict(model.named_modules())
        out: set[nn.Module] = set()
        for item in skip:
            if isinstance(item, str):
                if item not in named:
                    raise ValueError(f"skip: the model has no module named {item!r}")
                out.add(named[item])
            elif isinstance(item, nn.Module):
                if not any(m is item for m in named.values()):
                    raise ValueError(f"skip: {type(item).__name__} instance is not a module "
                                     f"of the model")
                out.add(item)
            elif isinstance(item, type) and issubclass(item, nn.Module):
                out.update(m for m in named.values() if isinstance(m, item))
            else:
                raise ValueError(f"skip entries must be module names, modules or module "
                                 f"types, got {item!r}")
        # a skipped container skips every layer inside it
        for m in list(out):
            out.update(m.modules())
        return out

    def remove_hooks(self) -> None:
        """Detach the module hooks (the optimizer then steps on its last inverses)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- collection (module hooks) -------------------------------------------------------
    def _collecting(self) -> bool:
        return self.steps % self.factor_every == 0

    def _keep_rows(self, layer: KFACLayer, t: int) -> bool:
        if self.policy == "eig":
            return False
        if self.policy == "woodbury":
            return True
        total = layer.rows + t  # global T is at least this: beyond the bounds it is eig
        return total <= self.auto_rho * layer.out_dim and total <= self.auto_t_max

    def _forward_hook(self, layer: KFACLayer):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if not (module.training and self._collecting() and torch.is_grad_enabled()):
                return
            if not isinstance(output, torch.Tensor) or not output.requires_grad or not inputs:
                return
            with torch.no_grad():
                a_cov, t, n = input_covariance(module, inputs[0].detach(),
                                               layer.bias is not None, layer.dtype)

            def on_grad(g: torch.Tensor) -> None:
                # A joins the collection only with its backward: eval-style forwards in
                # training mode without a backward leave the factors alone
                with torch.no_grad():
                    g = g.detach()
                    inv = self._inverse_grad_scale(g.device, layer.dtype)
                    if inv is not None:  # G from the unscaled output gradients
                        g = g.to(layer.dtype) * inv
                    layer.add(a_cov, t, grad_columns(module, g), n,
                              self._keep_rows(layer, t))
                self._collected = True

            output.register_hook(on_grad)

        return hook

    def _inverse_grad_scale(self, device: torch.device, dtype: torch.dtype
                            ) -> torch.Tensor | None:
        """``1 / scale`` of the GradScaler behind this backward, a 0-d tensor on ``device``
        (no host sync), or None when the gradients are not scaled. Read in the backward hook:
        the scale of the backward that made ``g``, also when the scaler skips the step that
        follows and lowers its scale before the statistics are folded in."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        scale = getattr(scaler, "_scale", None)  # the tensor scale() multiplied the loss by
        if not isinstance(scale, torch.Tensor):  # scale() not called yet: nothing was scaled
            return None
        return scale.to(device=device, dtype=torch.float64).reciprocal().to(dtype)

    # -- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One K-FAC step: factors and inverses when due, then the preconditioned update.
        A step with no gradient on any parameter is a no-op (it does not count)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if all(p.grad is None for g in self.param_groups for p in g["params"]):
            # no gradient at all (a step skipped by the probe, or stepped before a backward):
            # nothing moves, the step count and the factor/inverse schedules included, and the
            # statistics collected since the last factor step wait for the next real step
            return loss
        group = self.param_groups[0]
        lr, damping = group["lr"], group["damping"]
        bus = self.bus
        due_factors = self._collecting() and (self._collected or kfac_dist.world_size() > 1)
        if due_factors:
            with bus.span("kfac/factors"):
                self._update_factors()
        self._collected = False
        if self.steps % self.inverse_every == 0 or any(
                layer.has_factors() and (not layer.ready or layer.inverse_policy != layer.policy)
                for layer in self.layers):
            self._update_inverses(damping)
        with bus.span("kfac/precondition"):
            directions = self._precondition(lr, damping)
        self._apply(group, directions)
        self._emit()
        self.steps += 1
        return loss

    def _update_factors(self) -> None:
        layers = self.layers
        device = layers[0].weight.device
        nl = len(layers)
        counts = kfac_dist.gather_counts([layer.rows for layer in layers]
                                         + [layer.samples for layer in layers], device)
        per_rank = [c[:nl] for c in counts]
        totals = [sum(col) for col in zip(*per_rank)]
        samples = [sum(c[nl + i] for c in counts) for i in range(nl)]
        active = [(i, layer) for i, layer in enumerate(layers) if totals[i] > 0]
        for i, layer in active:
            name, reason = choose_policy(self.policy, totals[i], layer.out_dim, self.auto_rho,
                                         self.auto_t_max)
            if name == "woodbury":
                reason = f"{reason}; {DAMPING_NOTE[self.woodbury_damping]}"
            if name != layer.policy:
                layer.policy, layer.reason = name, reason
                if self.bus.wants("kfac/policy"):
                    self.bus.emit("kfac/policy", f"{name}: {reason}", param=layer.name)
            if name == "eig":
                layer.fold_rows()
        sums: list[torch.Tensor] = []
        for _, layer in active:
            zero = layer.weight.new_zeros
            sums.append(layer.a_sum if layer.a_sum is not None
                        else zero((layer.in_dim, layer.in_dim), dtype=layer.dtype))
            if layer.policy == "eig":
                # KFAC-expand: G sums over each sample's rows and averages over the N samples
                # (a conv's G is R = Ho*Wo times a per-row average); divided before the sum
                # over ranks, from the range-safe form, so only a G out of range overflows
                g = layer.g_sum_over(max(samples[i], 1))
                sums.append(g if g is not None
                            else zero((layer.out_dim, layer.out_dim), dtype=layer.dtype))
        sums = kfac_dist.all_reduce_sum(sums)
        decay = self.factor_decay
        k = 0
        for i, layer in active:
            T, N = totals[i], max(samples[i], 1)
            # A averages over the T rows. A factor out of the dtype's range (gradients of
            # ~1e19 and up in float32) is not folded in: the layer keeps its previous factor
            # (none yet: a NaN placeholder, dropped by the inverse refresh) and it is counted
            layer.A, ok_a = _fold(layer.A, sums[k] / T, decay)
            k += 1
            if layer.policy == "eig":
                layer.G, ok_g = _fold(layer.G, sums[k], decay)
                layer.U = None
                k += 1
            else:
                rows = kfac_dist.gather_rows(layer.collected_rows(),
                                             [c[i] for c in per_rank])
                # the latest rows (a running UUᵀ would not be low rank), scaled by sqrt(T/N)
                # so that G = U Uᵀ / T is the expand factor Σ g gᵀ / N
                U = rows.mT if T == N else rows.mT * math.sqrt(T / N)
                ok_g = _gram_in_range(U)
                layer.U = torch.where(ok_g, U, math.nan)
                layer.G = None
            layer.overflow = (~ok_a).to(torch.int64) + (~ok_g).to(torch.int64)
            layer.overflows = layer.overflows + layer.overflow
            layer.tokens = T
        for layer in layers:
            layer.reset_collection()

    def _update_inverses(self, damping: float, layers: list[KFACLayer] | None = None) -> None:
        kappa = self.max_condition
        budget = self.woodbury_device_budget
        for layer in self.layers if layers is None else layers:
            if not layer.has_factors():
                continue
            bad_a = not bool(torch.isfinite(layer.A).all())
            bad_g = not bool(torch.isfinite(layer.G if layer.policy == "eig" else layer.U).all())
            if bad_a or bad_g:
                # a first collection out of range (or a factor poisoned in a checkpoint): keep
                # the last good inverse, restart the bad factor at the next collection
                if bad_a:
                    layer.A = None
                if bad_g:
                    layer.G = layer.U = None
                continue
            # what this inverse is made of, so a checkpoint can rebuild it exactly
            inputs = {"A": layer.A.clone(), "G": None if layer.G is None else layer.G.clone(),
                      "U": layer.U, "tokens": layer.tokens, "policy": layer.policy,
                      "damping": float(damping)}
            with self.bus.span("kfac/eigh", param=layer.name):
                lA, QA, cA = clipped_eigh(layer.A, kappa)
                if layer.policy == "eig":
                    lG, QG, cG = clipped_eigh(layer.G, kappa)
            stats: dict[str, Any] = {"clipped_A": cA}
            if layer.policy == "eig":
                dA, dG = factored_damping(lA.mean(), lG.mean(), damping)
                layer.clear_inverse()
                layer.QA, layer.lA, layer.QG, layer.lG = QA, lA, QG, lG
                stats.update(cond_A=damped_condition(lA, dA.to(lA.dtype)),
                             cond_G=damped_condition(lG, dG.to(lG.dtype)), clipped_G=cG)
            elif self.woodbury_damping == "exact":
                with self.bus.span("kfac/woodbury", param=layer.name):
                    device, pin = self._woodbury_home(layer, budget)
                    low = LowRankEig(layer.U, layer.tokens, max_condition=kappa,
                                     store_dtype=self.woodbury_dtype, store_device=device,
                                     pin=pin)
                    if device == layer.weight.device:
                        budget -= low.nbytes
                    dA, dG = factored_damping(lA.mean(), low.mean, damping)  # telemetry only
                    dA, dG = dA.to(lA.dtype), dG.to(lA.dtype)
                layer.clear_inverse()
                layer.wood, layer.QA, layer.lA, layer.U = low, QA, lA, None
                lG = torch.stack([low.lam_min, low.lam_max])
                stats.update(cond_A=damped_condition(lA, dA), clipped_G=low.clipped,
                             cond_G=damped_condition(lG, dG.to(lG.dtype)))
            else:
                with self.bus.span("kfac/woodbury", param=layer.name):
                    U, T = layer.U, layer.tokens
                    mean_G = (U * U).sum() / (T * layer.out_dim)
                    dA, dG = factored_damping(lA.mean(), mean_G, damping)
                    dA, dG = dA.to(lA.dtype), dG.to(lA.dtype)
                    device, pin = self._woodbury_home(layer, budget)
                    wood = WoodburyInverse(U, T, dG, store_dtype=self.woodbury_dtype,
                                           store_device=device, pin=pin,
                                           max_condition=kappa)
                    if device == layer.weight.device:
                        budget -= wood.nbytes
                    A_inv = (QA / (lA + dA)) @ QA.mT
                layer.clear_inverse()
                layer.wood, layer.A_inv, layer.U = wood, A_inv, None
                stats.update(cond_A=damped_condition(lA, dA), cond_G=wood.condition(),
                             jitter=wood.jitter)
            layer.inverse_policy = layer.policy
            layer.stats = stats
            layer.inverse_inputs = inputs

    def _woodbury_home(self, layer: KFACLayer, budget: int) -> tuple[torch.device, bool]:
        """Where a layer's Woodbury factor lives: the device, or pinned host memory."""
        device = layer.weight.device
        cpu = torch.device("cpu")
        if self.woodbury_store == "device" or device.type == "cpu":
            return device, False
        if self.woodbury_store == "cpu":
            return cpu, True
        T = layer.tokens
        size = layer.out_dim * T * torch.empty((), dtype=self.woodbury_dtype).element_size() \
            + T * T * 4
        return (device, False) if size <= budget else (cpu, True)

    def _precondition(self, lr: float, damping: float
                      ) -> dict[nn.Parameter, torch.Tensor]:
        directions: dict[nn.Parameter, torch.Tensor] = {}
        pairs = []
        for layer in self.layers:
            if not layer.ready:
                continue
            v = layer.grad_matrix()
            if v is None:
                continue
            if layer.inverse_policy == "eig":
                if layer.denom_damping != damping:  # cached until damping or inverse change
                    layer.inv_denom = 1.0 / (layer.lG[:, None] * layer.lA[None, :] + damping)
                    layer.denom_damping = damping
                ng = layer.QG @ ((layer.QG.mT @ v @ layer.QA) * layer.inv_denom) @ layer.QA.mT
            elif layer.A_inv is None:  # low-rank G, exact Tikhonov damping
                ng = layer.wood.apply(v @ layer.QA, layer.lA, damping) @ layer.QA.mT
            else:  # Woodbury, factored damping
                ng = layer.wood.apply(v @ layer.A_inv)
            pairs.append((layer, v, ng))
        if not pairs:
            return directions
        scale = None
        if self.kl_clip is not None:
            # ν = min(1, sqrt(kl_clip / (lr² Σ ⟨NG, ∇⟩))): a tensor, no host sync
            # range-safely: ⟨NG, ∇/m⟩·m with m = max|∇| and the sum in float64, so that a huge
            # gradient on a stale inverse (its factor overflowed) still gets a bounded step
            dots = []
            for _, v, ng in pairs:
                m = v.abs().amax().clamp_min(torch.finfo(v.dtype).tiny)
                dots.append(torch.dot(ng.reshape(-1), (v / m).reshape(-1)).to(torch.float64)
                            * m.to(torch.float64))
            vg = torch.stack(dots).sum() * (lr * lr)
            dt = torch.float64 if all(ng.dtype == torch.float64 for _, _, ng in pairs) \
                else torch.float32
            tiny = torch.finfo(vg.dtype).tiny
            scale = torch.sqrt(self.kl_clip / vg.clamp_min(tiny)).clamp(max=1.0).to(dt)
        for layer, _, ng in pairs:
            if scale is not None:
                ng = ng * scale
            for p, d in layer.split(ng):
                directions[p] = d
        return directions

    def _apply(self, group: dict, directions: dict[nn.Parameter, torch.Tensor]) -> None:
        """Decoupled weight decay, momentum and the step, as foreach kernels per
        (device, dtype) bucket: the same arithmetic as a loop, without its per-tensor cost."""
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        buckets: dict[tuple, tuple[list, list, list]] = {}
        for p in group["params"]:
            d = directions.get(p)
            if d is None:
                if p.grad is None:
                    continue
                d = p.grad
            params, dirs, bufs = buckets.setdefault((p.device, p.dtype), ([], [], []))
            params.append(p)
            if momentum:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    state["momentum_buffer"] = d.detach().clone()
                else:
                    bufs.append(buf)
                    dirs.append(d)
                continue
            dirs.append(d)
        for params, dirs, bufs in buckets.values():
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            if momentum:
                if bufs:
                    torch._foreach_mul_(bufs, momentum)
                    torch._foreach_add_(bufs, dirs)
                steps = [self.state[p]["momentum_buffer"] for p in params]
            else:
                steps = dirs
            torch._foreach_add_(params, steps, alpha=-lr)

    def _emit(self) -> None:
        bus = self.bus
        for layer in self.layers:
            for key in ("cond_A", "cond_G", "clipped_A", "clipped_G", "jitter"):
                topic = "kfac/" + key
                if key in layer.stats and bus.wants(topic):
                    bus.emit(topic, layer.stats[key], param=layer.name)
            if layer.tokens and bus.wants("kfac/tokens"):
                bus.emit("kfac/tokens", layer.tokens, param=layer.name)
            if layer.overflow is not None:  # a factor step: how many factors were dropped
                if bus.wants("kfac/overflow"):
                    bus.emit("kfac/overflow", layer.overflow, param=layer.name)
                layer.overflow = None

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus, under ``"kfac"``, the step count and every layer's
        factors with the shapes they were built for."""
        sd = super().state_dict()
        sd["kfac"] = {
            "steps": self.steps,
            "layers": {layer.name: {**layer.signature(), "A": layer.A, "G": layer.G,
                                    "U": layer.U if layer.inverse_inputs is not None
                                    else layer.latest_rows(), "tokens": layer.tokens,
                                    "policy": layer.policy,
                                    "inverse_inputs": layer.inverse_inputs}
                       for layer in self.layers},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state; raises ``ValueError`` naming the layer when the saved factors do not
        fit the model (a bias that appeared or disappeared, a changed shape, a layer
        missing). Inverses are recomputed at the next step."""
        sd = dict(state_dict)
        saved = sd.pop("kfac", None)
        if saved is not None:
            self._check_saved(saved)
        super().load_state_dict(sd)
        if saved is None:
            return
        self.steps = int(saved["steps"])
        for layer in self.layers:
            rec = saved["layers"][layer.name]
            layer.reset_collection()
            layer.clear_inverse()
            inputs = rec.get("inverse_inputs")
            if inputs is not None:  # rebuild the inverse in use from what it was made of
                self._restore_factors(layer, inputs)
                self._update_inverses(float(inputs["damping"]), [layer])
            self._restore_factors(layer, rec)

    @staticmethod
    def _restore_factors(layer: KFACLayer, rec: dict) -> None:
        dev = layer.weight.device
        layer.A, layer.G, layer.U = (None if rec[k] is None
                                     else rec[k].to(dev, layer.dtype, copy=True)
                                     for k in ("A", "G", "U"))
        layer.tokens = int(rec["tokens"])
        layer.policy = rec["policy"]

    def _check_saved(self, saved: dict) -> None:
        if not isinstance(saved, dict) or "layers" not in saved or "steps" not in saved:
            raise ValueError("state_dict['kfac'] must hold 'steps' and 'layers' "
                             "(a KFAC.state_dict())")
        layers = saved["layers"]
        mine = {layer.name: layer for layer in self.layers}
        for name in layers:
            if name not in mine:
                raise ValueError(f"state_dict has K-FAC factors for layer {name!r}, which this "
                                 f"optimizer does not precondition (layers: "
                                 f"{', '.join(mine)})")
        for name, layer in mine.items():
            if name not in layers:
                raise ValueError(f"state_dict has no K-FAC factors for layer {name!r}")
            rec, sig = layers[name], layer.signature()
            if rec["has_bias"] != sig["has_bias"]:
                was, now = ("had a", "has no") if rec["has_bias"] else ("had no", "has a")
                raise ValueError(f"layer {name!r}: the saved factors {was} bias column but "
                                 f"the model's layer {now} trainable bias (a bias appeared or "
                                 f"disappeared)")
            if rec["kind"] != sig["kind"] or tuple(rec["weight_shape"]) != sig["weight_shape"]:
                raise ValueError(f"layer {name!r}: saved factors are for a {rec['kind']} with "
                                 f"weight {tuple(rec['weight_shape'])}, the model's layer is "
                                 f"a {sig['kind']} with weight {sig['weight_shape']}")
            for key, n in (("A", layer.in_dim), ("G", layer.out_dim)):
                t = rec.get(key)
                if t is not None and tuple(t.shape) != (n, n):
                    raise ValueError(f"layer {name!r}: saved factor {key} has shape "
                                     f"{tuple(t.shape)}, expected {(n, n)}")
            U = rec.get("U")
            if U is not None and (U.ndim != 2 or U.shape[0] != layer.out_dim):
                raise ValueError(f"layer {name!r}: saved Woodbury rows U have shape "
                                 f"{tuple(U.shape)}, expected ({layer.out_dim}, T)")


def _fold(old: torch.Tensor | None, new: torch.Tensor, decay: float
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(running average, ok)``: ``new`` folded into ``old`` when it is finite (``ok``, a
    0-d bool tensor: no host sync), else ``old`` unchanged; the first estimate starts it (a
    non-finite first estimate leaves a NaN factor that the inverse refresh drops)."""
    ok = torch.isfinite(new).all()
    if old is None:
        return torch.where(ok, new, math.nan), ok
    return torch.where(ok, torch.lerp(old, new, 1 - decay), old), ok


def _gram_in_range(U: torch.Tensor) -> torch.Tensor:
    """Whether ``U Uᵀ / T`` (``U`` ``[out, T]``) and the Woodbury arithmetic on it stay in
    ``U``'s dtype range: finite entries whose square times ``out·T`` fits (0-d bool)."""
    m = U.abs().amax().to(torch.float64) if U.numel() else U.new_zeros((), dtype=torch.float64)
    return torch.isfinite(U).all() & (m * m * U.numel() < torch.finfo(U.dtype).max)
