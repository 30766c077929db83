"""Telemetry never breaks a step: diagnostics on hostile gradients yield NaN, the update is
the one the optimizer computes without telemetry, bit for bit."""

import copy
import math

import pytest
import torch
from torch import nn

import probe
from optimizers import Muon
from optimizers.linalg import finite_eigvalsh, lanczos_extreme_eigvalsh
from tests.helpers import Recorder


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _muon_run(model, telemetry: bool, poison_step: int):
    opt = Muon(model.parameters(), lr=0.02)
    rec = Recorder()
    p = probe.attach(opt, model=model, every=1, collectors=[rec]) if telemetry else None
    torch.manual_seed(1)
    for i in range(4):
        x = torch.randn(16, 8)
        loss = model(x).square().mean()
        loss.backward()
        if i == poison_step:
            model[0].weight.grad[0, 0] = math.nan
        opt.step()
        opt.zero_grad()
    if p is not None:
        p.close()
    return rec


def test_muon_with_a_nan_gradient_under_the_probe_steps_as_without_telemetry():
    # was: torch._C._LinAlgError from ns_diagnostics' eigvalsh, out of opt.step()
    probed, bare = _net(), _net()
    rec = _muon_run(probed, telemetry=True, poison_step=2)
    _muon_run(bare, telemetry=False, poison_step=2)
    for a, b in zip(probed.parameters(), bare.parameters()):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(
            a.nan_to_num(), b.nan_to_num())
    nonfinite = [e for e in rec.events if e.topic == "anomaly/nonfinite" and e.step == 2
                 and e.param is None]
    assert nonfinite and nonfinite[0].value == 1.0
    sv = [e.value for e in rec.events if e.topic == "muon/sv_min" and e.step == 2
          and e.param == "group0.0"]
    assert sv and math.isnan(sv[0])
    clean = [e.value for e in rec.events if e.topic == "muon/sv_min" and e.step == 1
             and e.param == "group0.0"]
    assert clean and math.isfinite(clean[0])


def test_finite_eigvalsh_matches_numpy_and_gives_nan_for_a_nonfinite_matrix():
    import numpy as np

    torch.manual_seed(0)
    a = torch.randn(3, 5, 5, dtype=torch.float64)
    a = a @ a.mT
    a[1, 2, 3] = a[1, 3, 2] = math.inf
    a[2, 0, 0] = math.nan
    ev = finite_eigvalsh(a)
    np.testing.assert_allclose(ev[0].numpy(), np.linalg.eigvalsh(a[0].numpy()),
                               rtol=1e-9, atol=1e-12)
    assert ev[1:].isnan().all()


def test_lanczos_on_a_nonfinite_matrix_gives_nan_not_an_exception():
    a = torch.eye(64)
    a[3, 3] = math.nan
    lo, hi = lanczos_extreme_eigvalsh(a, 8)
    assert math.isnan(lo.item()) and math.isnan(hi.item())


def test_a_raising_diagnostic_is_counted_and_the_step_goes_on(monkeypatch, capsys):
    model = _net()
    twin = copy.deepcopy(model)
    opt, twin_opt = Muon(model.parameters(), lr=0.02), Muon(twin.parameters(), lr=0.02)

    def boom(*a, **k):
        raise RuntimeError("diagnostic exploded")

    monkeypatch.setattr("optimizers.muon.ns_diagnostics", boom)
    rec = Recorder()
    with probe.attach(opt, model=model, every=1, collectors=[rec]):
        for m, o in ((model, opt), (twin, twin_opt)):
            for _ in range(2):
                m(torch.ones(2, 8)).sum().backward()
                o.step()
                o.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert rec.values("probe/diagnostic_errors")[-1] == 4.0  # 2 steps x 2 shape buckets
    assert capsys.readouterr().err.count("diagnostic Muon muon/ns_telemetry failed") == 1


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_muon_telemetry_on_extreme_scales_equals_telemetry_off(scale):
    probed, bare = _net(), _net()
    for model, tele in ((probed, True), (bare, False)):
        opt = Muon(model.parameters(), lr=0.02)
        p = probe.attach(opt, model=model, every=1, collectors=[Recorder()]) if tele else None
        for _ in range(2):
            for q in model.parameters():
                q.grad = torch.full_like(q, scale)
            opt.step()
        if p is not None:
            p.close()
    for a, b in zip(probed.parameters(), bare.parameters()):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
