"""Every optimizer under the probe: hostile gradients stay finite, 10 + 10 steps equal 20,
a skipped step is bit-identical.

To cover an optimizer, add a factory to ``OPTIMIZERS`` below: a function taking the model
and returning the optimizer, e.g. ``"Muon": lambda m: optimizers.Muon(m.named_parameters())``.
Every test here runs on it.
"""

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import hooks
import optimizers
import probe
from tests.helpers import Recorder


def _block_schedule(model):
    named = list(model.named_parameters())
    # one block per layer of _model(); ParameterList holds the very same Parameter objects
    layers: dict[str, list] = {}
    for name, p in named:
        layers.setdefault(name.split(".")[0], []).append(p)
    blocks = [nn.ParameterList(ps) for ps in layers.values()]
    return optimizers.BlockSchedule(torch.optim.AdamW([p for _, p in named], lr=1e-2),
                                    blocks, threshold=0.6, probe_every=3, total_steps=20)


OPTIMIZERS = {
    "BlockSchedule": _block_schedule,
    "Falcon": lambda m: optimizers.Falcon(m.named_parameters(), lr=1e-2, total_steps=20),
    "KFAC": lambda m: optimizers.KFAC(m, lr=0.05, factor_every=2, inverse_every=3),
    "Muon": lambda m: optimizers.Muon(m.named_parameters(), lr=0.02, weight_decay=0.01),
    "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9,
                                         nesterov=True, weight_decay=1e-4),
}


def _bus(opt):
    # a project optimizer emits on its own bus, which the probe must drive
    return getattr(opt, "bus", None) or hooks.Bus()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g), torch.randn(16, 4, generator=g)


def _train(model, opt, steps, start=0):
    for s in range(start, start + steps):
        x, y = _batch(s)
        (model(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _hostile(kind, shape, scale, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "zero":
        return torch.zeros(shape)
    if kind == "rank1":
        u = torch.randn(shape[0], 1, generator=g) if len(shape) == 2 else None
        return (u @ torch.randn(1, shape[1], generator=g)) * scale if u is not None \
            else torch.full(shape, scale)
    if kind == "duplicated_rows":
        if len(shape) == 1:
            return torch.full(shape, scale)
        return torch.randn(1, shape[1], generator=g).expand(shape).clone() * scale
    return torch.randn(shape, generator=g) * scale  # "dense"


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["zero", "rank1", "duplicated_rows", "dense"]),
       scale=st.sampled_from([0.0, 1e-30, 1e-8, 1.0, 1e8, 1e30]),
       seed=st.integers(0, 2**16))
def test_hostile_gradients_keep_updates_finite(name, kind, scale, seed):
    model = _model()
    named = list(model.named_parameters())
    opt = OPTIMIZERS[name](model)
    with probe.attach(opt, model=model, every=1, collectors=[Recorder()], bus=_bus(opt)):
        for step in range(3):
            for i, (_, p) in enumerate(named):
                p.grad = _hostile(kind, tuple(p.shape), scale, seed + 31 * step + i)
            opt.step()
            for pname, p in named:
                assert torch.isfinite(p).all(), (name, kind, scale, pname, step)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resume_after_10_steps_equals_20_steps(name, tmp_path):
    ref = _model()
    ref_opt = OPTIMIZERS[name](ref)
    with probe.attach(ref_opt, model=ref, every=1, collectors=[Recorder()], bus=_bus(ref_opt)):
        _train(ref, ref_opt, 20)

    first = _model()
    opt = OPTIMIZERS[name](first)
    with probe.attach(opt, model=first, every=1, collectors=[Recorder()], bus=_bus(opt)):
        _train(first, opt, 10)
        buf = io.BytesIO()
        torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    second = _model()
    opt2 = OPTIMIZERS[name](second)
    with probe.attach(opt2, model=second, every=1, collectors=[Recorder()],
                      bus=_bus(opt2)) as p:
        second.load_state_dict(ckpt["model"])
        opt2.load_state_dict(ckpt["opt"])
        assert p.step == 10
        _train(second, opt2, 10, start=10)
    for (n, a), (_, b) in zip(ref.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), (name, n)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_skipped_step_leaves_parameters_and_state_bit_identical(name):
    model = _model()
    named = list(model.named_parameters())
    opt = OPTIMIZERS[name](model)
    with probe.attach(opt, model=model, every=1, collectors=[Recorder()], bus=_bus(opt),
                      on_nonfinite="skip") as p:
        _train(model, opt, 3)
        before = opt.state_dict()
        before = {"state": {k: {n: v.clone() if torch.is_tensor(v) else v
                                for n, v in s.items()} for k, s in before["state"].items()},
                  "param_groups": before["param_groups"]}
        values = [t.detach().clone() for _, t in named]
        x, y = _batch(99)
        (model(x) - y).square().mean().backward()
        named[0][1].grad.view(-1)[0] = float("inf")
        opt.step()
        after = opt.state_dict()
        assert p.skipped_steps == 1
    for v, (_, t) in zip(values, named):
        assert torch.equal(v, t.detach())
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for k, s in before["state"].items():
        assert after["state"][k].keys() == s.keys()
        for n, v in s.items():
            assert torch.equal(torch.as_tensor(after["state"][k][n]), torch.as_tensor(v)), (k, n)
