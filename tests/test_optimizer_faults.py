"""In-step diagnostics of Muon, Falcon and BlockSchedule never break or change a step.

Each test drives one optimizer twice over the same injected gradients, once bare and once
under ``probe.attach(every=1)``, and asks for bit-identical parameters and state: telemetry
observes, it never steers. Issue 18's crash (a NaN gradient made the singular-value
telemetry's eigensolver raise out of ``Muon.step``) is the first test.
"""

import copy
import math

import pytest
import torch
from torch import nn

import hooks
import optimizers
import probe
from optimizers.newton_schulz import ns_diagnostics
from tests.helpers import Recorder


def _grads(shapes, steps, seed=0, poison=None):
    """Gradients per step; ``poison(step, index, grad)`` may spoil one in place."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(steps):
        row = [torch.randn(sh, generator=g) for sh in shapes]
        if poison is not None:
            for i, gr in enumerate(row):
                poison(s, i, gr)
        out.append(row)
    return out


def _run(make, shapes, grads, dtype=torch.float32, probed=True):
    """Parameters and optimizer state after stepping ``make(named params)`` over ``grads``."""
    torch.manual_seed(0)
    params = [torch.randn(sh, dtype=dtype).requires_grad_() for sh in shapes]
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    opt = make(named)
    rec = Recorder()
    probe_ctx = probe.attach(opt, every=1, collectors=[rec]) if probed else None
    try:
        for row in grads:
            for p, gr in zip(params, row):
                p.grad = gr.to(dtype).clone()
            opt.step()
    finally:
        if probe_ctx is not None:
            probe_ctx.close()
    state = {k: v for k, v in opt.state_dict()["state"].items()}
    return params, state, rec


def _bits(t):
    return t.detach().reshape(-1).view(torch.uint8) if t.is_floating_point() else t


def _assert_same(a, b):
    """Bit for bit (NaN payloads and signed zeros included)."""
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(_bits(x), _bits(y))


def _assert_same_state(sa, sb):
    assert sa.keys() == sb.keys()
    for k in sa:
        for key in sa[k]:
            va, vb = sa[k][key], sb[k][key]
            if isinstance(va, torch.Tensor):
                _assert_same([va], [vb])
            else:
                assert va == vb


def _muon(bus_holder):
    def make(named):
        bus = hooks.Bus()
        bus_holder.append(bus)
        return optimizers.Muon(named, lr=0.02, weight_decay=0.01, bus=bus)
    return make


@pytest.mark.parametrize("side", [8, 40])  # exact eigvalsh (<= 32) and the Lanczos path
def test_muon_nan_gradient_under_probe_every_1_does_not_crash(side):
    shapes = [(side, side), (side, side), (side,)]

    def poison(step, i, g):
        if step == 1 and i == 0:
            g[0, 0] = math.nan

    grads = _grads(shapes, 3, poison=poison)
    bare, bare_state, _ = _run(_muon([]), shapes, grads, probed=False)
    ours, state, rec = _run(_muon([]), shapes, grads)
    _assert_same(bare, ours)
    _assert_same_state(bare_state, state)
    # the NaN parameter's figures are NaN, the clean one's are finite; the anomaly is named
    sv = {(e.step, e.tags["param"]): e.value for e in rec.events if e.topic == "muon/sv_min"}
    res = {(e.step, e.tags["param"]): e.value for e in rec.events
           if e.topic == "muon/ns_residual"}
    assert math.isnan(sv[(1, "p0")]) and math.isnan(res[(1, "p0")])
    assert math.isfinite(sv[(1, "p1")]) and 0.0 < sv[(1, "p1")] < 2.0
    assert any(e.topic == "anomaly/nonfinite" and e.tags.get("param") == "p0"
               for e in rec.events)
    assert not any(e.topic == "probe/diagnostic_errors" for e in rec.events)


def test_ns_diagnostics_give_nan_for_non_finite_matrices_only():
    X = torch.randn(3, 40, 50)
    X[1, 2, 3] = math.inf
    X[2, 0, 0] = math.nan
    for exact_below in (0, 64):  # Lanczos and eigvalsh
        d = ns_diagnostics(X, exact_below=exact_below)
        ref = torch.linalg.svdvals(X[0].double())
        assert math.isnan(d.sv_min[1]) and math.isnan(d.sv_max[2])
        assert math.isnan(d.residual[1]) and math.isnan(d.residual[2])
        assert d.sv_max[0] <= ref[0] * (1 + 1e-5) and d.sv_min[0] >= ref[-1] * (1 - 1e-5)
        if exact_below:
            torch.testing.assert_close(d.sv_max[0].double(), ref[0], rtol=1e-5, atol=0)


def test_a_diagnostic_that_raises_is_counted_and_the_step_is_unchanged(monkeypatch):
    shapes = [(8, 8), (8,)]
    grads = _grads(shapes, 3)
    bare, bare_state, _ = _run(_muon([]), shapes, grads, probed=False)

    def broken(*args, **kwargs):
        raise RuntimeError("broken diagnostic")

    monkeypatch.setattr(optimizers.muon, "ns_diagnostics", broken)
    ours, state, rec = _run(_muon([]), shapes, grads)
    _assert_same(bare, ours)
    _assert_same_state(bare_state, state)
    counts = [e.value for e in rec.events if e.topic == "probe/diagnostic_errors"]
    assert counts == [1.0, 2.0, 3.0]
    # the fallback (1-D) parameter still got its telemetry after the failure
    assert any(e.topic == "muon/update_rms" and e.tags["param"] == "p1" for e in rec.events)


def _falcon(backend):
    def make(named):
        return optimizers.Falcon(named, lr=1e-2, backend=backend, rank_k=2, mask_interval=2,
                                 total_steps=4, bus=hooks.Bus())
    return make


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("backend", ["svd", "poweriter"])
def test_falcon_non_finite_gradient_keeps_the_step_and_reports(backend, bad):
    shapes = [(6, 4, 3, 3), (6, 4, 3, 3), (6,)]

    def poison(step, i, g):
        if step == 1 and i == 0:
            g[0, 0, 1, 1] = bad

    grads = _grads(shapes, 4, poison=poison)
    bare, bare_state, _ = _run(_falcon(backend), shapes, grads, probed=False)
    ours, state, rec = _run(_falcon(backend), shapes, grads)
    _assert_same(bare, ours)
    _assert_same_state(bare_state, state)
    # the clean conv weight never saw the NaN: its weights and statistics stay finite
    assert torch.isfinite(ours[1]).all()
    cos = {(e.step, e.tags["param"]): e.value for e in rec.events
           if e.topic == "falcon/cos_raw_filtered"}
    assert math.isfinite(cos[(1, "p1")]) and math.isnan(cos[(1, "p0")])
    fallbacks = [e.value for e in rec.events if e.topic == "falcon/svd_fallbacks"]
    assert fallbacks == ([1.0] if backend == "svd" else [])


def test_falcon_svd_failure_falls_back_to_power_iteration(monkeypatch):
    from optimizers import falcon

    def fails(a, k):
        raise torch.linalg.LinAlgError("no convergence")

    g = torch.randn(6, 4, 3, 3)
    want = falcon.filter_grad(g, 0.9, rank_k=2, backend="poweriter", poweriter_steps=3)
    monkeypatch.setattr(falcon, "lowrank_svd", fails)
    got = falcon.filter_grad(g, 0.9, rank_k=2, backend="svd", poweriter_steps=3)
    assert got.svd_failed and not want.svd_failed
    assert torch.equal(got.grad, want.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_block_schedule_steps_on_every_float_dtype(dtype):
    # issue 19.1: float64 crashed in _foreach_norm(dtype=float32) after the inner step
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)
    opt = optimizers.BlockSchedule(torch.optim.SGD(model.parameters(), lr=0.1),
                                   [model[0], model[2]], probe_every=2, bus=hooks.Bus())
    for _ in range(3):
        model(torch.randn(5, 6, dtype=dtype)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert opt.steps == 3
    rel = torch.tensor(opt.relevance(), dtype=torch.float64)
    assert torch.isfinite(rel).all() and (rel > 0).all()


def test_block_relevance_of_float64_matches_numpy():
    import numpy as np

    from optimizers.block_relevance import block_index, block_relevance
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(7),
          torch.randn(3, 3, generator=g, dtype=torch.float64).half()]
    gs = [torch.randn(w.shape, generator=g).to(w.dtype) for w in ws]
    idx = block_index([2, 1])
    got = block_relevance(gs, ws, idx, 2, 1e-8)

    def nrm(ts):
        return math.sqrt(sum(float(np.sum(t.double().numpy() ** 2)) for t in ts))

    want = [nrm(gs[:2]) / (nrm(ws[:2]) + 1e-8), nrm(gs[2:]) / (nrm(ws[2:]) + 1e-8)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


def test_block_schedule_failing_relevance_read_keeps_the_step(monkeypatch):
    import optimizers.block_schedule as bs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    bus = hooks.Bus()
    rec = Recorder()
    bus.subscribe(rec)
    opt = optimizers.BlockSchedule(torch.optim.SGD(model.parameters(), lr=0.1),
                                   [model[0], model[2]], probe_every=2, bus=bus)

    def broken(*a, **k):
        raise RuntimeError("broken read")

    monkeypatch.setattr(bs, "block_relevance", broken)
    bus.begin_step(0)
    model(torch.randn(5, 6)).square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    bus.end_step()
    assert opt.steps == 1 and all(math.isnan(r) for r in opt.relevance())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert [e.value for e in rec.events if e.topic == "probe/diagnostic_errors"] == [1.0]


@pytest.mark.parametrize("eps", [math.inf, math.nan, 0.0, -1.0, "1e-8"])
def test_block_schedule_rejects_bad_eps(eps):
    model = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        optimizers.BlockSchedule(torch.optim.SGD(model.parameters(), lr=0.1), [model],
                                 eps=eps)


# -- a step with no gradient changes nothing (what makes on_nonfinite="skip" a no-op) ---------

def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.Flatten(),
                         nn.Linear(6 * 2 * 2, 4))


SKIPPERS = {
    # probe_every=2 and no freeze delay: the gate, the selection and the probe steps all
    # move within the 8 steps, so a skipped step that advanced any of them would show
    "BlockSchedule": lambda m, bus: optimizers.BlockSchedule(
        torch.optim.AdamW(m.parameters(), lr=1e-2), [m[0], m[2], m[4]], threshold=0.5,
        probe_every=2, total_steps=8, bus=bus),
    # factor_every=2, inverse_every=3: the step count, both schedules and the factor averages
    # all move within the 8 steps
    "KFAC": lambda m, bus: optimizers.KFAC(m, lr=0.05, factor_every=2, inverse_every=3,
                                           bus=bus),
    "Muon": lambda m, bus: optimizers.Muon(m.named_parameters(), lr=0.02, bus=bus),
    "Falcon": lambda m, bus: optimizers.Falcon(m.named_parameters(), lr=1e-2, mask_interval=3,
                                               total_steps=8, bus=bus),
}


def _skip_run(name, skip_at, use_skip):
    model = _conv_net()
    bus = hooks.Bus()
    opt = SKIPPERS[name](model, bus)
    with probe.attach(opt, model=model, every=1, collectors=[Recorder()], bus=bus,
                      on_nonfinite="skip") as p:
        for s in range(8):
            g = torch.Generator().manual_seed(s)
            x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randn(4, 4, generator=g)
            (model(x) - y).square().mean().backward()
            if s in skip_at:
                if use_skip:
                    model[4].weight.grad.view(-1)[0] = math.nan  # never frozen
                    opt.step()  # the probe hides every gradient: the step must do nothing
                else:
                    opt.zero_grad()
                    continue
            else:
                opt.step()
            opt.zero_grad()
        skipped = p.skipped_steps
    return model, opt, skipped


@pytest.mark.parametrize("name", sorted(SKIPPERS))
def test_skipped_step_equals_leaving_the_step_out(name):
    skip_at = {2, 3, 5}
    ref, ref_opt, _ = _skip_run(name, skip_at, use_skip=False)
    got, opt, skipped = _skip_run(name, skip_at, use_skip=True)
    assert skipped == len(skip_at)
    for (n, a), (_, b) in zip(ref.named_parameters(), got.named_parameters()):
        assert torch.equal(a, b), n
    sa, sb = ref_opt.state_dict(), opt.state_dict()
    sa.pop("optprobe", None)
    sb.pop("optprobe", None)
    _assert_same_state(sa["state"], sb["state"])
    if name == "BlockSchedule":
        ra, rb = sa["block_schedule"], sb["block_schedule"]
        assert ra.keys() == rb.keys()
        _assert_same_schedule(ra, rb)
        assert ra["t"] == 8 - len(skip_at) and ra["selections"] > 0
    if name == "KFAC":
        assert sa["kfac"]["steps"] == sb["kfac"]["steps"] == 8 - len(skip_at)
        _assert_same_kfac(sa["kfac"], sb["kfac"])


@pytest.mark.parametrize("name", sorted(SKIPPERS))
def test_a_step_without_gradients_changes_nothing(name):
    model = _conv_net()
    opt = SKIPPERS[name](model, hooks.Bus())
    model(torch.randn(2, 3, 6, 6)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    before = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in model.parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    opt.step()
    after = opt.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(values, model.parameters()))
    assert flags == [p.requires_grad for p in model.parameters()]
    _assert_same_state(before["state"], after["state"])
    if name == "BlockSchedule":
        _assert_same_schedule(before["block_schedule"], after["block_schedule"])
    if name == "KFAC":  # the step count (hence both schedules) and the factors stay
        assert before["kfac"]["steps"] == after["kfac"]["steps"] == 1
        _assert_same_kfac(before["kfac"], after["kfac"])


def _assert_same_kfac(ka, kb):
    assert ka["steps"] == kb["steps"] and ka["layers"].keys() == kb["layers"].keys()
    for name, la in ka["layers"].items():
        lb = kb["layers"][name]
        for key in ("A", "G", "U", "tokens", "policy"):
            if isinstance(la[key], torch.Tensor):
                _assert_same([la[key]], [lb[key]])
            else:
                assert la[key] == lb[key], (name, key)


def _assert_same_schedule(ra, rb):
    assert ra.keys() == rb.keys()
    for k in ra:
        if isinstance(ra[k], torch.Tensor):
            _assert_same([ra[k]], [rb[k]])
        else:
            assert ra[k] == rb[k], k
