"""optimizers.Muon against torch.optim.Muon and torch.optim.AdamW, routing, state and telemetry."""

import contextlib
import copy
import io
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import hooks
from optimizers import Muon
from optimizers import muon as muon_module
from tests.helpers import Recorder


@contextlib.contextmanager
def torch_muon_in_fp32():
    """torch.optim.Muon hard-codes bf16 in its Newton-Schulz (``grad.bfloat16()``); redirect
    that cast so its own code runs in fp32 for an fp32 comparison."""
    orig = torch.Tensor.bfloat16
    torch.Tensor.bfloat16 = lambda self, *a, **k: self.to(torch.float32, copy=True)
    try:
        yield
    finally:
        torch.Tensor.bfloat16 = orig


def leaves(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def clone_leaves(ps):
    return [p.detach().clone().requires_grad_() for p in ps]


def set_grads(groups, seed):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=g) for p in groups[0]]
    for ps in groups:
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()


SHAPES_2D = [(32, 64), (64, 16), (32, 64), (20, 20), (32, 64)]


@pytest.mark.parametrize("adjust_lr", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
def test_parity_with_torch_muon_over_20_steps(adjust_lr, ns_dtype):
    ours, ref = leaves(SHAPES_2D), None
    ref = clone_leaves(ours)
    opt = Muon(ours, lr=0.02, momentum=0.9, weight_decay=0.1, ns_dtype=ns_dtype,
               adjust_lr=adjust_lr)
    ropt = torch.optim.Muon(ref, lr=0.02, momentum=0.9, weight_decay=0.1,
                            adjust_lr_fn=adjust_lr)
    for step in range(20):
        set_grads([ours, ref], seed=step)
        opt.step()
        with torch_muon_in_fp32() if ns_dtype == "float32" else contextlib.nullcontext():
            ropt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert any((a - b0).abs().max() > 0.05 for a, b0 in zip(ours, leaves(SHAPES_2D)))


def test_parity_without_nesterov_and_with_batching_off():
    ours, ref = leaves(SHAPES_2D, seed=1), None
    ref = clone_leaves(ours)
    opt = Muon(ours, lr=0.05, nesterov=False, ns_dtype="float32", batch_shapes=False)
    ropt = torch.optim.Muon(ref, lr=0.05, nesterov=False, weight_decay=0.0)
    for step in range(20):
        set_grads([ours, ref], seed=100 + step)
        opt.step()
        with torch_muon_in_fp32():
            ropt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_conv_weight_is_flattened_like_a_2d_parameter():
    conv = leaves([(8, 3, 3, 3), (6, 40, 1, 1)], seed=2)  # wide and tall once flattened
    flat = [p.detach().reshape(p.shape[0], -1).clone().requires_grad_() for p in conv]
    opt = Muon(conv, lr=0.03, ns_dtype="float32")
    ropt = torch.optim.Muon(flat, lr=0.03, weight_decay=0.0)
    for step in range(10):
        g = torch.Generator().manual_seed(step)
        for c, f in zip(conv, flat):
            gr = torch.randn(c.shape, generator=g)
            c.grad, f.grad = gr.clone(), gr.reshape(f.shape).clone()
        opt.step()
        with torch_muon_in_fp32():
            ropt.step()
    for c, f in zip(conv, flat):
        torch.testing.assert_close(c.detach().reshape(f.shape), f.detach(), rtol=1e-6,
                                   atol=1e-7)


def test_fallback_matches_torch_adamw():
    shapes = [(16,), (3, 5, 7), (1, 40), (4, 512), ()]
    ours = leaves(shapes, seed=3)
    ref = clone_leaves(ours)
    opt = Muon(ours, lr=0.02, lr_fallback=1e-2, wd_fallback=0.05, betas_fallback=(0.8, 0.99),
               eps_fallback=1e-6)
    assert [g["route"] for g in opt.param_groups] == ["adamw"]
    ropt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6)
    for step in range(20):
        set_grads([ours, ref], seed=200 + step)
        opt.step()
        ropt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fallback_defaults():
    w, b = leaves([(8, 8), (8,)])
    g = {r["route"]: r for r in Muon([w, b], lr=0.02, weight_decay=0.1).param_groups}
    assert g["adamw"]["lr"] == 3e-4 and g["adamw"]["weight_decay"] == 0.1
    assert g["muon"]["lr"] == 0.02
    g = {r["route"]: r for r in Muon([w, b], lr=0.01, adjust_lr="match_rms_adamw",
                                     wd_fallback=0.0).param_groups}
    assert g["adamw"]["lr"] == 0.01 and g["adamw"]["weight_decay"] == 0.0


def test_lr_scheduler_scales_both_routes():
    w, b = leaves([(8, 8), (8,)])
    opt = Muon([w, b], lr=0.02, lr_fallback=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.01, 5e-4]


class RoutedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.conv = nn.Conv2d(3, 16, 3)
        self.proj = nn.Linear(16, 16)
        self.skinny = nn.Parameter(torch.randn(1, 64))
        self.wide = nn.Parameter(torch.randn(4, 512))
        self.cube = nn.Parameter(torch.randn(2, 3, 4))
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.head = nn.Linear(16, 10, bias=False)


def test_routing_of_conv_bias_embedding_skinny_and_vectors():
    net = RoutedNet()
    named = list(net.named_parameters())
    marked = ("embed.weight", "head.weight")
    opt = Muon([{"params": [(n, p) for n, p in named if n not in marked]},
                {"params": [(n, p) for n, p in named if n in marked], "use_muon": False}])
    routes = {r.name: r for r in opt.routes}
    expect = {"conv.weight": "muon", "proj.weight": "muon", "conv.bias": "adamw",
              "proj.bias": "adamw", "skinny": "adamw", "wide": "adamw", "cube": "adamw",
              "scale": "adamw", "embed.weight": "adamw", "head.weight": "adamw"}
    assert {n: r.route for n, r in routes.items()} == expect
    assert "conv [out, in*kh*kw] 16x27" in routes["conv.weight"].reason
    assert "min_dim" in routes["skinny"].reason
    assert "aspect 128.0 > max_aspect 32" in routes["wide"].reason
    assert "not 2-D/4-D" in routes["cube"].reason and "1-D" in routes["conv.bias"].reason
    assert "use_muon=False" in routes["embed.weight"].reason
    table = opt.routing_table()
    total = sum(p.numel() for p in net.parameters())
    share = (16 * 27 + 16 * 16) / total
    assert f"coverage: {100 * share:.2f}% of {total} elements" in table
    assert "(2 of 10 parameters)" in table
    assert all(n in table for n in expect)
    # the size checks are thresholds: relaxing them moves the parameters
    opt = Muon(net.named_parameters(), min_dim=1, max_aspect=200.0)
    routes = {r.name: r.route for r in opt.routes}
    assert routes["skinny"] == routes["wide"] == routes["embed.weight"] == "muon"


def test_routing_table_is_emitted_once():
    net = RoutedNet()
    bus = hooks.Bus()
    rec = Recorder()
    bus.subscribe(rec, "muon/routing")
    opt = Muon(net.named_parameters(), bus=bus)
    for step in range(3):
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        bus.begin_step(step)
        opt.step()
        bus.end_step()
    assert rec.topics() == ["muon/routing"]
    assert rec.events[0].value == opt.routing_table()


def test_names_when_unnamed():
    opt = Muon([{"params": leaves([(4, 4), (4,)])}, {"params": leaves([(6, 6)])}])
    assert [r.name for r in opt.routes] == ["group0.0", "group0.1", "group1.0"]


def test_normalize_weights_after_rescales_to_sqrt_rows_after_the_update():
    ours = leaves([(8, 3, 3, 3), (16, 24), (16,)], seed=4)
    ref = clone_leaves(ours[:2])
    bias_before = ours[2].detach().clone()
    opt = Muon(ours, lr=0.05, normalize_weights="after", ns_dtype="float32")
    ropt = torch.optim.Muon([p.detach().reshape(p.shape[0], -1).clone().requires_grad_()
                             for p in ref], lr=0.05, weight_decay=0.0)
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for p, gr in zip(ours, grads):
            p.grad = gr
        for f, gr in zip(ropt.param_groups[0]["params"], grads):
            f.grad = gr.reshape(f.shape).clone()
        opt.step()
        with torch_muon_in_fp32():
            ropt.step()
        with torch.no_grad():  # AirBench: W <- W * sqrt(rows) / ||W|| after the update
            for f in ropt.param_groups[0]["params"]:
                f.mul_(math.sqrt(f.shape[0]) / f.norm())
    for p, f in zip(ours, ropt.param_groups[0]["params"]):
        torch.testing.assert_close(p.detach().reshape(f.shape), f, rtol=1e-5, atol=1e-6)
        assert abs(p.norm().item() - math.sqrt(p.shape[0])) < 1e-4
    assert not torch.equal(ours[2].detach(), bias_before)  # the fallback moved, unscaled


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32),
                         nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32),
                         nn.Linear(32, 4))


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 3, 8, 8, generator=g)
        y = torch.randint(0, 4, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_state_dict_round_trip_is_exact():
    kw = dict(lr=0.02, weight_decay=0.01, ns_tol=0.35, lr_fallback=1e-3)
    straight = _model()
    opt = Muon(straight.named_parameters(), **kw)
    _train(straight, opt, 10, seed=7)
    resumed = copy.deepcopy(straight)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    _train(straight, opt, 10, seed=8)

    fresh = Muon(resumed.named_parameters(), **kw)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    _train(resumed, fresh, 10, seed=8)
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    assert {"momentum_buffer"} <= set(fresh.state[resumed[0].weight])
    assert fresh.state[resumed[0].bias]["step"] == 20


def test_shape_batched_equals_unbatched():
    a, b = _model(), _model()
    _train(a, Muon(a.parameters(), lr=0.02), 5, seed=9)
    _train(b, Muon(b.parameters(), lr=0.02, batch_shapes=False), 5, seed=9)
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_zero_gradient_gives_finite_update():
    w, conv = leaves([(16, 32), (4, 2, 3, 3)])
    before = [w.detach().clone(), conv.detach().clone()]
    opt = Muon([w, conv], lr=0.1, ns_tol=0.1)
    w.grad, conv.grad = torch.zeros_like(w), torch.zeros_like(conv)
    opt.step()
    assert torch.equal(w.detach(), before[0]) and torch.equal(conv.detach(), before[1])


def _direct(delta: torch.Tensor):
    """(residual, sv_min, sv_max) of an NS output recovered from the applied step."""
    a = delta.double().reshape(delta.shape[0], -1).numpy()
    s = scipy.linalg.svd(a, compute_uv=False)
    if a.shape[0] > a.shape[1]:
        a = a.T
    m = a.shape[0]
    return float(np.linalg.norm(np.eye(m) - a @ a.T) / np.sqrt(m)), s.min(), s.max()


@pytest.mark.parametrize("batch_shapes", [True, False])
def test_telemetry_matches_direct_computation(batch_shapes):
    model = _model()
    named = dict(model.named_parameters())
    bus = hooks.Bus(every=2)
    rec = Recorder()
    bus.subscribe(rec, ["muon/*", "time/muon/*"])
    opt = Muon(model.named_parameters(), lr=0.02, bus=bus, batch_shapes=batch_shapes)
    g = torch.Generator().manual_seed(11)
    applied = {}
    for step in range(4):
        x = torch.randn(16, 3, 8, 8, generator=g)
        nn.functional.cross_entropy(model(x), torch.randint(0, 4, (16,), generator=g)).backward()
        before = {n: p.detach().clone() for n, p in named.items()}
        bus.begin_step(step)
        opt.step()
        bus.end_step()
        opt.zero_grad()
        applied[step] = {n: before[n] - p.detach() for n, p in named.items()}
    assert {e.step for e in rec.events} == {0, 2}  # sampled steps only
    routes = {r.name: r for r in opt.routes}
    muon_names = [n for n, r in routes.items() if r.route == "muon"]
    assert muon_names == ["0.weight", "3.weight", "5.weight", "7.weight", "8.weight"]
    for step in (0, 2):
        ev = {(e.topic, e.param): e.value for e in rec.events if e.step == step}
        for n in muon_names:
            rows, cols = routes[n].matrix_shape
            lr_adj = 0.02 * math.sqrt(max(1.0, rows / cols))
            res, lo, hi = _direct(applied[step][n] / lr_adj)
            assert ev[("muon/ns_residual", n)] == pytest.approx(res, rel=1e-4)
            # from a float32 Gram matrix: a singular value near 0 is resolved to ~sqrt(eps)
            assert ev[("muon/sv_min", n)] == pytest.approx(lo, rel=1e-3, abs=1e-3)
            assert ev[("muon/sv_max", n)] == pytest.approx(hi, rel=1e-3)
            assert ev[("muon/ns_iters", n)] == 5.0
            rms = applied[step][n].double().pow(2).mean().sqrt().item()
            assert ev[("muon/update_rms", n)] == pytest.approx(rms, rel=1e-4)
        for n in ("0.bias", "3.bias", "8.bias"):
            assert routes[n].route == "adamw"
            rms = applied[step][n].double().pow(2).mean().sqrt().item()
            assert ev[("muon/update_rms", n)] == pytest.approx(rms, rel=1e-4)
            assert ("muon/ns_residual", n) not in ev
        assert ev[("time/muon/newton_schulz", None)] > 0
        assert ev[("time/muon/fallback", None)] > 0


def test_ns_tol_iterations_are_reported_per_parameter():
    bus = hooks.Bus()
    rec = Recorder()
    bus.subscribe(rec, "muon/ns_iters")
    well = torch.linalg.qr(torch.randn(24, 24))[0][:, :12].T.contiguous()  # orthonormal rows
    p1, p2 = leaves([(12, 24), (12, 24)])
    opt = Muon([("well", p1), ("gauss", p2)], ns_tol=0.2, ns_steps=8,
               ns_coefficients=(1.875, -1.25, 0.375), momentum=0.0, bus=bus)
    p1.grad, p2.grad = well * 3.0, torch.randn(12, 24) * torch.logspace(0, -2, 24)
    bus.begin_step(0)
    opt.step()
    bus.end_step()
    iters = {e.param: e.value for e in rec.events}
    # every singular value of "well" is 1/sqrt(12) after normalization: its residual after k
    # iterations is |1 - phi^k(1/sqrt(12))^2|; the first even k under 0.2 is where it stops
    x, k = 1 / math.sqrt(12), 0
    while True:
        for _ in range(2):
            x = 1.875 * x - 1.25 * x ** 3 + 0.375 * x ** 5
        k += 2
        if abs(1 - x * x) < 0.2:
            break
    assert iters["well"] == float(k) < 8
    assert iters["gauss"] > iters["well"]


def test_diagnostics_are_computed_only_when_wanted(monkeypatch):
    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise AssertionError("diagnostics computed with nobody listening")

    monkeypatch.setattr(muon_module, "ns_diagnostics", boom)
    model = _model()
    bus = hooks.Bus()
    rec = Recorder()
    bus.subscribe(rec, "time/*")
    opt = Muon(model.parameters(), bus=bus)
    bus.begin_step(0)
    _train(model, opt, 1, seed=1)
    bus.end_step()
    assert rec.topics() and all(t.startswith("time/") for t in rec.topics())
    assert not calls
    bus.subscribe(Recorder(), "muon/sv_max")
    bus.begin_step(1)
    _train(model, opt, 1, seed=1)  # the raising diagnostic is counted, not raised
    assert calls and opt._guard.errors == len(calls)


def test_with_probe_attach():
    import probe

    model = _model()
    opt = Muon(model.named_parameters(), bus=hooks.Bus())
    rec = Recorder()
    with probe.attach(opt, model=model, collectors=[rec], every=1, gpu=False):
        _train(model, opt, 2, seed=3)
    topics = set(rec.topics())
    assert {"muon/ns_residual", "muon/routing", "time/muon/newton_schulz",
            "update/norm"} <= topics
    assert {e.param for e in rec.events if e.topic == "muon/sv_max"} == \
        {"0.weight", "3.weight", "5.weight", "7.weight", "8.weight"}


@pytest.mark.cuda
def test_cuda_auto_bf16_matches_torch_muon():
    ours = [p.detach().cuda().requires_grad_() for p in leaves(SHAPES_2D)]
    ref = clone_leaves(ours)
    opt = Muon(ours, lr=0.02, weight_decay=0.1)
    ropt = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1)
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(ours, ref):
            gr = torch.randn(a.shape, generator=g).cuda()
            a.grad, b.grad = gr.clone(), gr.clone()
        opt.step()
        ropt.step()
    for a, b in zip(ours, ref):  # bf16 batched kernels may round differently from single mm
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
    bus = hooks.Bus(device="cuda")
    rec = Recorder()
    bus.subscribe(rec, ["muon/*", "time/*"])
    opt.bus = bus
    bus.begin_step(0)
    opt.step()
    bus.end_step()
    bus.flush()
    assert "muon/ns_residual" in rec.topics() and "time/muon/newton_schulz" in rec.topics()


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1.0}, "lr must be a finite float in \\[0, 1e\\+18\\]"),
    ({"lr": float("inf")}, "lr must be a finite float"),
    ({"lr": float("nan")}, "lr must be a finite float"),
    ({"lr": 1e300}, "lr must be a finite float in \\[0, 1e\\+18\\]"),
    ({"weight_decay": float("inf")}, "weight_decay must be a finite float"),
    ({"lr_fallback": float("inf")}, "lr_fallback must be a finite float"),
    ({"wd_fallback": float("inf")}, "wd_fallback must be a finite float"),
    ({"eps_fallback": float("inf")}, "eps_fallback must be a finite float"),
    ({"ns_coefficients": "123"}, "ns_coefficients must be three finite floats"),
    ({"ns_coefficients": (True, 2.0, 3.0)}, "ns_coefficients must be three finite floats"),
    ({"lr": "0.1"}, "lr must be"),
    ({"momentum": 1.0}, "momentum must be a finite float in \\[0, 1\\)"),
    ({"momentum": -0.1}, "momentum"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"nesterov": 1}, "nesterov must be True or False"),
    ({"ns_steps": 0}, "ns_steps must be an int in \\[1, 100\\]"),
    ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients must be three finite floats"),
    ({"ns_dtype": "int8"}, "ns_dtype must be 'auto' or one of"),
    ({"ns_tol": 0.0}, "ns_tol must be None or a float in \\(0, inf\\)"),
    ({"adjust_lr": "rms"}, "adjust_lr must be None, 'original' or 'match_rms_adamw'"),
    ({"normalize_weights": "yes"}, "normalize_weights must be False, True"),
    ({"normalize_weights": 1}, "normalize_weights must be False, True"),
    ({"fallback": "sgd"}, "fallback must be 'adamw' or None"),
    ({"lr_fallback": -1e-3}, "lr_fallback must be a finite float in \\[0, 1e\\+18\\]"),
    ({"wd_fallback": -1.0}, "wd_fallback"),
    ({"betas_fallback": (0.9,)}, "betas_fallback must be a pair"),
    ({"betas_fallback": (0.9, 1.0)},
     "betas_fallback\\[1\\] must be a finite float in \\[0, 1\\)"),
    ({"eps_fallback": 0.0}, "eps_fallback must be a finite float in \\(0, 1e\\+18\\]"),
    ({"min_dim": 0}, "min_dim must be an int >= 1"),
    ({"max_aspect": 0.5}, "max_aspect must be a float >= 1"),
    ({"bus": "bus"}, "bus must be a hooks.Bus or None"),
    ({"batch_shapes": None}, "batch_shapes must be True or False"),
])
def test_invalid_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Muon(leaves([(4, 4)]), **kwargs)


def test_invalid_groups_raise_value_error():
    w, b = leaves([(4, 4), (4,)])
    with pytest.raises(ValueError, match="lr must be"):
        Muon([{"params": [w], "lr": -1.0}])
    with pytest.raises(ValueError, match="fallback=None but group0.1 cannot go to "
                                         "Newton-Schulz \\(1-D"):
        Muon([w, b], fallback=None)
    with pytest.raises(ValueError, match="use_muon=True needs a 2-D or 4-D parameter"):
        Muon([{"params": [b], "use_muon": True}])
    with pytest.raises(ValueError, match="use_muon must be None, True or False"):
        Muon([{"params": [w], "use_muon": "no"}])
    opt = Muon([w])
    w.grad = torch.eye(4).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
