"""Falcon the optimizer: torch.optim.AdamW on gradients filtered by the numpy reference is
the oracle; telemetry, selection, schedules, state_dict and argument checks."""

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

import hooks
from optimizers import Falcon
from optimizers.falcon_optimizer import scheduled
from tests.helpers import Recorder
from tests.test_falcon_filter import ref_filter, ref_mask

FILTERABLE = ["0.weight", "3.weight"]  # 3x3 and 5x5 convs; 5.weight is 1x1


def net(dtype=torch.float64, first_bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1, bias=first_bias), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 5, padding=2), nn.ReLU(), nn.Conv2d(5, 4, 1), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3)).to(dtype)


def batches(n: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 2, 6, 6, generator=gen, dtype=dtype),
             torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


def reference_adamw(model: nn.Module, lr: float, betas, wd: float) -> torch.optim.AdamW:
    """torch's AdamW with Falcon's decay rule: no decay on biases and norm weights (<= 1-d)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=betas)


def assert_same_params(a: nn.Module, b: nn.Module, rtol: float, atol: float) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)


def drive(bus: hooks.Bus, opt: torch.optim.Optimizer, model: nn.Module, data) -> None:
    for step, (x, y) in enumerate(data):
        backward(model, x, y)
        bus.begin_step(step)
        opt.step()
        bus.end_step()


@pytest.mark.parametrize("apply_to", [[], lambda name: False])
def test_filtering_nothing_is_adamw_step_for_step(apply_to):
    model, ref_model = net(), net()
    opt = Falcon(model.named_parameters(), lr=3e-2, betas=(0.8, 0.95), weight_decay=0.1,
                 apply_to=apply_to, bus=hooks.Bus())
    ref = reference_adamw(ref_model, 3e-2, (0.8, 0.95), 0.1)
    assert opt.filtered_names == []
    for x, y in batches(6):
        backward(model, x, y)
        backward(ref_model, x, y)
        opt.step()
        ref.step()
        assert_same_params(model, ref_model, rtol=1e-12, atol=1e-14)
    assert not torch.equal(model[0].weight, net()[0].weight)


def test_filtered_steps_match_reference_filter_then_adamw():
    total, interval = 5, 2
    # no bias before the BatchNorm: its gradient is zero up to rounding, which Adam's
    # normalisation turns into lr-sized steps, so the filter's last-bit differences from the
    # numpy reference would grow there into a mismatch that says nothing about the filter
    model, ref_model = net(first_bias=False), net(first_bias=False)
    opt = Falcon(model.named_parameters(), lr=1e-2, weight_decay=0.05, backend="svd", rank_k=1,
                 retain_energy=(0.95, 0.5), skip_mix=(0.0, 0.6), total_steps=total,
                 mask_interval=interval, bus=hooks.Bus())
    ref = reference_adamw(ref_model, 1e-2, (0.9, 0.999), 0.05)
    assert opt.filtered_names == FILTERABLE
    named = dict(ref_model.named_parameters())
    masks: dict = {}
    for t, (x, y) in enumerate(batches(7)):
        backward(model, x, y)
        backward(ref_model, x, y)
        frac = min(t / (total - 1), 1.0)
        retain, lam = 0.95 + (0.5 - 0.95) * frac, 0.6 * frac
        for name in FILTERABLE:
            p = named[name]
            g = p.grad.numpy()
            if t % interval == 0:
                masks[name] = ref_mask(g, retain)
            p.grad = torch.from_numpy(ref_filter(g, masks[name], 1, lam))
        opt.step()
        ref.step()
        assert_same_params(model, ref_model, rtol=1e-9, atol=1e-12)
    assert any(m.sum() < m.size for m in masks.values())  # the masks did drop bins


def test_telemetry_topics_values_and_spans():
    model = net()
    bus = hooks.Bus(every=1, strict=True)
    rec = Recorder()
    bus.subscribe(rec, ["falcon/*", "time/falcon/*"])
    opt = Falcon(model.named_parameters(), retain_energy=0.8, skip_mix=(0.0, 0.5),
                 total_steps=3, mask_interval=3, bus=bus)
    data = batches(7)
    backward(model, *data[0])
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    drive(bus, opt, model, data)
    per_param = ["falcon/retained_energy", "falcon/mask_sparsity", "falcon/lowrank_residual",
                 "falcon/cos_raw_filtered", "falcon/mask_recomputed"]
    for topic in per_param:
        params = {e.param for e in rec.events if e.topic == topic}
        assert params == set(FILTERABLE), topic
    recomputed = [e.value for e in rec.events
                  if e.topic == "falcon/mask_recomputed" and e.param == "0.weight"]
    assert recomputed == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert rec.values("falcon/filtered_fraction") == [2 / 10] * 7
    assert rec.values("falcon/retain_target") == [0.8] * 7
    assert rec.values("falcon/skip_mix") == pytest.approx([0.0, 0.25, 0.5, 0.5, 0.5, 0.5, 0.5])
    for name in FILTERABLE:  # step 0 against numpy, from the raw gradient
        g = raw[name].numpy()
        keep = ref_mask(g, 0.8)
        energy = (np.abs(np.fft.rfft2(g)) ** 2).sum(axis=(0, 1))
        got = rec.values("falcon/retained_energy", name)
        # the bus hands values over as float32
        assert got[0] == pytest.approx(energy[keep].sum() / energy.sum(), rel=1e-6)
        assert got[0] >= 0.8
        sparsity = rec.values("falcon/mask_sparsity", name)[0]
        assert sparsity == pytest.approx(1 - keep.mean(), rel=1e-6)
        assert all(0.0 <= v <= 1.0 for v in rec.values("falcon/lowrank_residual", name))
        assert all(-1.0 <= v <= 1.0 for v in rec.values("falcon/cos_raw_filtered", name))
    spans = {(e.topic, e.param) for e in rec.events if e.topic.startswith("time/")}
    for stage in ("fft", "mask", "lowrank", "ifft"):
        assert {(f"time/falcon/{stage}", n) for n in FILTERABLE} <= spans
    assert ("time/falcon/adamw", None) in spans


def test_unsampled_steps_emit_nothing():
    model = net()
    bus = hooks.Bus(every=2, strict=True)
    rec = Recorder()
    bus.subscribe(rec, ["falcon/*", "time/falcon/*"])
    drive(bus, Falcon(model.named_parameters(), bus=bus), model, batches(4))
    assert {e.step for e in rec.events} == {0, 2}


def test_apply_to_selects_conv_weights():
    model = net()

    def names(**kw):
        return Falcon(model.named_parameters(), bus=hooks.Bus(), **kw).filtered_names

    assert names(apply_to=[-1]) == ["3.weight"]
    assert names(apply_to=(0, 1, -2)) == FILTERABLE
    assert names(apply_to=lambda n: n.startswith("3")) == ["3.weight"]
    assert names(min_kernel=1) == ["0.weight", "3.weight", "5.weight"]
    assert names(min_kernel=5) == ["3.weight"]
    unnamed = Falcon(model.parameters(), bus=hooks.Bus())
    assert unnamed.filtered_names == ["group0.0", "group0.4"]
    with pytest.raises(ValueError, match=r"apply_to index 2 is out of range \[-2, 2\)"):
        names(apply_to=[2])
    with pytest.raises(ValueError, match="apply_to must be None, a predicate"):
        names(apply_to="0.weight")
    with pytest.raises(ValueError, match="apply_to indices must be ints"):
        names(apply_to=[0.0])


def test_schedule_is_linear_then_held():
    assert scheduled((0.9, 0.6), 0, 11) == 0.9
    assert scheduled((0.9, 0.6), 5, 11) == pytest.approx(0.75)
    assert scheduled((0.9, 0.6), 10, 11) == pytest.approx(0.6)
    assert scheduled((0.9, 0.6), 50, 11) == pytest.approx(0.6)
    assert scheduled((0.9, 0.6), 7, None) == 0.9
    assert scheduled((0.3, 0.3), 7, 11) == 0.3


def test_state_dict_round_trip_keeps_masks():
    data = batches(8)
    model = net()
    opt = Falcon(model.named_parameters(), mask_interval=5, retain_energy=0.7, total_steps=8,
                 bus=hooks.Bus())
    for x, y in data[:3]:
        backward(model, x, y)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    twin = copy.deepcopy(model)
    bus = hooks.Bus(strict=True)
    rec = Recorder()
    bus.subscribe(rec, "falcon/mask_recomputed")
    loaded = Falcon(twin.named_parameters(), mask_interval=5, retain_energy=0.7, total_steps=8,
                    bus=bus)
    buf.seek(0)
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    for name, p, q in zip(FILTERABLE, (model[0].weight, model[3].weight),
                          (twin[0].weight, twin[3].weight)):
        mask = loaded.state[q]["mask"]
        assert mask.dtype == torch.bool, name
        assert torch.equal(mask, opt.state[p]["mask"]), name
        assert loaded.state[q]["step"] == 3
    for t, (x, y) in enumerate(data[3:], start=3):
        backward(model, x, y)
        backward(twin, x, y)
        opt.step()
        bus.begin_step(t)
        loaded.step()
        bus.end_step()
        assert_same_params(model, twin, rtol=0, atol=0)
    assert rec.values("falcon/mask_recomputed", "0.weight") == [0.0, 0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("every,interval,want", [
    (10, 5, [1.0, 2.0, 2.0]),  # issue 17.5: a 0/1 flag read 1.0 at every sample here
    (4, 3, [1.0, 1.0, 1.0, 2.0, 1.0, 1.0]),  # samples 0, 4, .. 20; rebuilds 0, 3, .. 18
    (1, 2, [1.0, 0.0] * 5),
])
def test_mask_recomputed_counts_rebuilds_between_samples(every, interval, want):
    model = net()
    bus = hooks.Bus(every=every, strict=True)
    rec = Recorder()
    bus.subscribe(rec, "falcon/mask_recomputed")
    opt = Falcon(model.named_parameters(), mask_interval=interval, bus=bus)
    steps = every * (len(want) - 1) + 1
    drive(bus, opt, model, batches(steps))
    assert rec.values("falcon/mask_recomputed", "0.weight") == want
    # the counts add up to the rebuilds that happened: ceil(steps / interval)
    assert sum(want) == -(-steps // interval)


def test_zero_gradients_stay_finite():
    model = net()
    opt = Falcon(model.named_parameters(), bus=hooks.Bus())
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_closure_and_param_groups():
    model = net()
    conv, rest = list(model[0].parameters()), list(model[3:].parameters())
    opt = Falcon([{"params": conv, "retain_energy": 0.5, "rank_k": 2}, {"params": rest}],
                 bus=hooks.Bus())
    assert opt.param_groups[0]["retain_energy"] == (0.5, 0.5)
    assert opt.param_groups[1]["retain_energy"] == (0.9, 0.6)
    x, y = batches(1)[0]
    loss = opt.step(lambda: nn.functional.cross_entropy(model(x), y).backward() or 1.5)
    assert loss == 1.5
    with pytest.raises(ValueError, match="rank_k must be an int >= 1"):
        opt.add_param_group({"params": list(model[1].parameters()), "rank_k": 0})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("kwargs,match", [
    ({"retain_energy": 0.0}, r"retain_energy must be a number in \(0, 1\]"),
    ({"retain_energy": 1.2}, "retain_energy"),
    ({"retain_energy": (0.9, 0.0)}, r"retain_energy end must be a number in \(0, 1\]"),
    ({"retain_energy": (0.9, 0.8, 0.7)}, r"retain_energy must be a number or a \(start, end\)"),
    ({"skip_mix": (-0.1, 0.5)}, r"skip_mix start must be a number in \[0, 1\]"),
    ({"rank_k": 0}, "rank_k must be an int >= 1"),
    ({"backend": "lanczos"}, "backend must be one of 'svd', 'poweriter'"),
    ({"poweriter_steps": 0}, "poweriter_steps must be an int >= 1"),
    ({"mask_interval": 0}, "mask_interval must be an int >= 1"),
    ({"fast_mask": "yes"}, "fast_mask must be True or False"),
    ({"min_kernel": 0}, "min_kernel must be an int >= 1"),
    ({"total_steps": 0}, "total_steps must be None or an int >= 1"),
    ({"lr": -1.0}, "lr must be a number >= 0"),
    ({"betas": (0.9, 1.0)}, r"betas must be a pair of numbers in \[0, 1\)"),
    ({"eps": -1e-8}, "eps must be a number >= 0"),
    ({"weight_decay": -0.1}, "weight_decay must be a number >= 0"),
    ({"bus": object()}, "bus must be a hooks.Bus or None"),
])
def test_bad_arguments_raise_before_any_step(kwargs, match):
    model = net()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        Falcon(model.named_parameters(), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_integer_parameters_are_refused():
    with pytest.raises(ValueError, match="real floating-point parameters"):
        Falcon([torch.zeros(3, dtype=torch.long)], bus=hooks.Bus())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    cpu, gpu = net(torch.float32), net(torch.float32).cuda().to(dtype)
    o_cpu = Falcon(cpu.named_parameters(), total_steps=6, mask_interval=2, bus=hooks.Bus())
    bus = hooks.Bus(device="cuda", strict=True)
    rec = Recorder()
    bus.subscribe(rec, ["falcon/*", "time/falcon/*"])
    o_gpu = Falcon(gpu.named_parameters(), total_steps=6, mask_interval=2, bus=bus)
    for t, (x, y) in enumerate(batches(6, torch.float32)):
        backward(cpu, x, y)
        backward(gpu, x.cuda().to(dtype), y.cuda())
        o_cpu.step()
        bus.begin_step(t)
        o_gpu.step()
        bus.end_step()
    bus.flush()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(q.float().cpu(), p, rtol=tol, atol=tol)
    assert {e.topic for e in rec.events} >= {"time/falcon/fft", "falcon/retained_energy"}


def test_zero_size_conv_weight_is_left_alone():
    # a pruned-away conv (0 output channels) has no spectrum to filter: no crash, no update
    conv, empty = nn.Conv2d(2, 4, 3), nn.Conv2d(2, 0, 3)
    opt = Falcon([("conv.weight", conv.weight), ("empty.weight", empty.weight)],
                 bus=hooks.Bus())
    conv.weight.grad = torch.randn_like(conv.weight)
    empty.weight.grad = torch.randn_like(empty.weight)
    before = conv.weight.detach().clone()
    opt.step()
    assert empty.weight.shape == (0, 2, 3, 3) and not torch.equal(conv.weight, before)
