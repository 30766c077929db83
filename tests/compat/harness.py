"""One training loop for every compatibility case: probed and unprobed runs from one seed, and
float64 references for the probe's per-parameter statistics.

The references are computed from what the test itself sees: the gradient the optimizer
received (cloned right after backward, or inside the first closure call of a step), the
parameters before the step and after it. The probe's convention (probe/stats.py,
``step_norms`` then ``finish_stats``): ``update/cos_grad`` is the cosine of (-update, grad),
``update/ratio`` is |update| / |param before| (NaN where the parameter norm is 0) and the
totals are the root of the summed squares of the per-parameter norms.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import probe
from tests.helpers import Recorder

STEPS = 3
PER_PARAM = ("grad/norm", "param/norm", "update/norm", "update/ratio", "update/cos_grad")
TOTALS = ("grad/norm", "param/norm", "update/norm")
REL, ABS = 2e-5, 1e-6  # float32 norms in the probe against float64 references


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(step: int, n: int = 16, d_in: int = 6, d_out: int = 3) -> tuple:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)


def mse(model: nn.Module, data: tuple) -> torch.Tensor:
    x, y = data
    return (model(x) - y).square().mean()


def as_f64(t: torch.Tensor) -> torch.Tensor:
    """A dense float64 (complex128 for complex) copy; a sparse gradient is coalesced first, so
    duplicate indices count as the sum they stand for."""
    t = t.detach()
    if t.is_sparse:
        t = t.coalesce().to_dense()
    if hasattr(t, "full_tensor"):  # a DTensor
        t = t.full_tensor()
    return t.to(torch.complex128 if t.is_complex() else torch.float64).clone()


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t).reshape(-1) if t.is_complex() else t.reshape(-1)


def reference(before: dict, after: dict, grads: dict) -> dict:
    """{(topic, name): value} of one step, and {(topic, None): total} (float64)."""
    out, sq = {}, {t: 0.0 for t in TOTALS}
    for name, g in grads.items():
        w, u, g = _real(before[name]), _real(after[name] - before[name]), _real(g)
        gn, wn, un = (float(torch.linalg.vector_norm(x)) for x in (g, w, u))
        row = {"grad/norm": gn, "param/norm": wn, "update/norm": un,
               "update/ratio": un / wn if wn > 0 else math.nan,
               "update/cos_grad": float(torch.dot(-u, g)) / max(un * gn, 1e-30)}
        for topic, v in row.items():
            out[(topic, name)] = v
        for topic in TOTALS:
            sq[topic] += row[topic] ** 2
    for topic in TOTALS:
        out[(topic, None)] = math.sqrt(sq[topic])
    return out


def grads_of(named: list) -> dict:
    """float64 copies of the gradients present now, by parameter name."""
    return {n: as_f64(t.grad) for n, t in named if t.grad is not None}


@dataclass
class Run:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    recorder: Recorder | None
    probe: probe.Probe | None
    refs: list[dict] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def params(self) -> dict:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}


def train(make_model: Callable[[], nn.Module],
          make_opt: Callable[[nn.Module], torch.optim.Optimizer], *, probed: bool,
          steps: int = STEPS, loss: Callable = mse, data: Callable = batch,
          closure: bool = False, attach_to: Callable | None = None,
          on_train: Callable | None = None, **attach_kwargs) -> Run:
    """``steps`` optimizer steps from seed 0; ``closure=True`` steps with a closure (the
    received gradient is the one its first call made); ``attach_to(opt)`` picks what the probe
    is attached to; ``on_train(opt)`` runs once before the loop (schedule-free's train())."""
    torch.manual_seed(0)
    model = make_model()
    opt = make_opt(model)
    if on_train is not None:
        on_train(opt)
    named = list(model.named_parameters())
    rec = Recorder() if probed else None
    p = probe.attach(attach_to(opt) if attach_to else opt, model=model, every=1,
                     collectors=[rec], **attach_kwargs) if probed else None
    run = Run(model, opt, rec, p)
    with p if p is not None else contextlib.nullcontext():
        for s in range(steps):
            data_s = data(s)
            before = {n: as_f64(t) for n, t in named}
            received: dict = {}
            if closure:
                def closure_fn(data_s=data_s, received=received):
                    opt.zero_grad()
                    out = loss(model, data_s)
                    out.backward()
                    if not received:
                        received.update(grads_of(named))
                    return out

                value = opt.step(closure_fn)
            else:
                opt.zero_grad()
                value = loss(model, data_s)
                value.backward()
                received.update(grads_of(named))
                opt.step()
            run.losses.append(float(value.detach()))
            run.refs.append(reference(before, {n: as_f64(t) for n, t in named}, received))
    return run


def probed_values(rec: Recorder) -> dict:
    """{(step, topic, param or None): value} of every statistic the probe delivered."""
    out = {}
    for e in rec.events:
        if e.topic in PER_PARAM and set(e.tags) <= {"param", "rank", "reduced"}:
            out[(e.step, e.topic, e.tags.get("param"))] = e.value
    return out


def close(a: float, b: float, rel: float = REL, abs_: float = ABS) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= abs_ + rel * abs(b)


def check_stats(rec: Recorder, refs: list[dict], rel: float = REL, abs_: float = ABS,
                topics: tuple = PER_PARAM, steps: list[int] | None = None) -> None:
    """Every reference number of every step (or of ``steps``) is what the probe delivered."""
    got = probed_values(rec)
    bad = []
    for s, ref in enumerate(refs):
        if steps is not None and s not in steps:
            continue
        for (topic, name), want in ref.items():
            if topic not in topics:
                continue
            have = got.get((s, topic, name))
            if have is None or not close(have, want, rel, abs_):
                bad.append(f"step {s} {topic}[{name or 'total'}]: probe {have}, want {want:.7g}")
    assert not bad, f"{len(bad)} statistics differ:\n" + "\n".join(bad[:12])


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    diff = [n for n in pa if not torch.equal(as_f64(pa[n]), as_f64(pb[n]))]
    assert not diff, f"probed run's parameters differ from the unprobed run's: {diff}"


def both(make_model, make_opt, **kw) -> tuple[Run, Run]:
    """The unprobed run and the probed run of one case."""
    return train(make_model, make_opt, probed=False, **kw), \
        train(make_model, make_opt, probed=True, **kw)
