"""BlockSchedule: selection, clamps, gates, probes, budget, recovery, freezing, checkpoints."""

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import hooks
from dashboards import read_events
from optimizers import BlockSchedule
from tests.helpers import Recorder

# -- a schedule whose relevance the test sets by hand ---------------------------------------
# Each block is one bias-free 2x2 Linear with weight all ones (||W|| = 2); SGD with lr=0
# keeps it so. A gradient full of a/2 has norm a, so block relevance is a / (2 + eps).


def manual(n=4, **kw):
    blocks = [nn.Linear(2, 2, bias=False) for _ in range(n)]
    for b in blocks:
        nn.init.constant_(b.weight, 1.0)
    opt = torch.optim.SGD([b.weight for b in blocks], lr=0.0)
    return blocks, BlockSchedule(opt, blocks, **kw)


def give_grads(blocks, norms):
    """Set the gradients backward would give the active blocks (frozen ones get none)."""
    for b, a in zip(blocks, norms):
        b.weight.grad = torch.full((2, 2), a / 2.0) if b.weight.requires_grad else None


def run(blocks, sched, steps, norms=(1.0, 2.0, 3.0, 4.0), losses=None):
    """Take ``steps`` steps; returns the active count each step ran with."""
    active = []
    for i in range(steps):
        active.append(sum(b.weight.requires_grad for b in blocks))
        assert active[-1] == sched.active
        give_grads(blocks, norms)
        sched.step(None if losses is None else losses[i])
        sched.zero_grad()
    return active


def test_selection_matches_hand_computation():
    # s = [0.5, 1, 1.5, 2], total 5; threshold 0.7 needs 3.5 from the back: 2 + 1.5 -> 2 blocks
    blocks, sched = manual(threshold=0.7, probe_every=100)
    run(blocks, sched, 1)
    np.testing.assert_allclose(sched.relevance(), [0.5, 1.0, 1.5, 2.0], rtol=1e-6)
    assert sched.active == 2 and sched.phase == "open"
    assert sched.frozen_blocks() == ["block0", "block1"]
    assert [b.weight.requires_grad for b in blocks] == [False, False, True, True]


def test_relevance_ema_by_hand():
    blocks, sched = manual(beta=0.5, freeze_after=3)
    run(blocks, sched, 1, norms=(1.0, 2.0, 3.0, 4.0))
    run(blocks, sched, 1, norms=(3.0, 2.0, 1.0, 8.0))
    # EMA starts at the first measurement: 0.5 * s0 + 0.5 * s1, with s = norm / 2
    np.testing.assert_allclose(sched.relevance(), [1.0, 1.0, 1.0, 3.0], rtol=1e-6)


@pytest.mark.parametrize("kw,expected", [
    ({"threshold": 0.3}, 1),                              # hand: 2 >= 1.5 -> 1 block
    ({"threshold": 0.3, "min_active": 3}, 3),             # clamped up
    ({"threshold": 1.0}, 4),                              # every block
    ({"threshold": 1.0, "max_active": 2}, 2),             # clamped down
    ({"threshold": 0.7, "min_active": 2, "max_active": 3}, 2),
])
def test_min_max_clamps(kw, expected):
    blocks, sched = manual(**kw)
    assert run(blocks, sched, 3)[1:] == [expected, expected]


def test_gating_by_step_count():
    blocks, sched = manual(threshold=0.7, freeze_after=5, probe_every=100)
    phases = []
    for _ in range(8):
        phases.append(sched.phase)
        run(blocks, sched, 1)
    assert phases == ["warmup"] * 5 + ["open"] * 3
    blocks, sched = manual(threshold=0.7, freeze_after=0.25, total_steps=20, probe_every=100)
    assert run(blocks, sched, 7) == [4, 4, 4, 4, 4, 2, 2]  # ceil(0.25 * 20) = 5


def _first_stable(losses, window, rel_bound, cv_bound):
    """Independent reference: the first t whose last two windows pass both bounds."""
    for t in range(2 * window - 1, len(losses)):
        last = np.asarray(losses[t + 1 - window:t + 1])
        prev = np.asarray(losses[t + 1 - 2 * window:t + 1 - window])
        rel = abs(last.mean() - prev.mean()) / abs(prev.mean())
        cv = np.std(last) / abs(last.mean())
        if rel <= rel_bound and cv <= cv_bound:
            return t
    return None


@pytest.mark.parametrize("freeze_after", [0, 30])
def test_gating_by_loss_stability(freeze_after):
    t = np.arange(60)
    losses = (1.0 + 4.0 * 0.8 ** t + 0.01 * (-1.0) ** t).tolist()
    stable_at = _first_stable(losses, 5, 0.01, 0.02)
    assert stable_at is not None and 10 < stable_at < 40
    open_at = max(stable_at + 1, freeze_after)
    bus = hooks.Bus()
    rec = Recorder()
    bus.subscribe(rec, "blocks/gate")
    blocks, sched = manual(threshold=0.7, stable_window=5, stable_rel_change=0.01,
                           stable_cv=0.02, freeze_after=freeze_after, probe_every=1000, bus=bus)
    active = []
    for i in range(50):
        bus.begin_step(i)
        active += run(blocks, sched, 1, losses=[torch.tensor(losses[i])])
        bus.end_step()
    assert active == [4] * open_at + [2] * (50 - open_at)
    gates = [(e.step, e.value.split(":")[0]) for e in rec.events]
    waiting = [] if open_at == max(freeze_after, 1) else [(max(freeze_after, 1), "waiting")]
    assert gates == [(0, "warmup"), *waiting, (open_at, f"open at step {open_at}")]
    assert "loss stable" in rec.events[-1].value


def test_stability_gate_needs_the_loss():
    blocks, sched = manual(stable_window=3)
    give_grads(blocks, (1, 1, 1, 1))
    with pytest.raises(ValueError, match="loss"):
        sched.step()
    assert sched.steps == 0


def test_probe_steps_measure_every_block():
    blocks, sched = manual(threshold=0.7, probe_every=4)
    active = run(blocks, sched, 13)
    assert active == [4, 2, 2, 2, 4, 2, 2, 2, 4, 2, 2, 2, 4]
    # a probe sees the front again: relevance that moved to the front grows the suffix
    blocks, sched = manual(threshold=0.7, probe_every=4, beta=0.0)
    run(blocks, sched, 4)
    assert sched.is_probe()
    run(blocks, sched, 1, norms=(9.0, 0.1, 0.1, 0.1))
    assert sched.active == 4 and sched.relevance()[0] == pytest.approx(4.5, rel=1e-6)


def test_adaptive_budget_grows_and_shrinks():
    # hand: selection 2 blocks; probes every 3 steps; interval means vs the loss EMA
    blocks, sched = manual(threshold=0.7, probe_every=3, grow_above=1.05, shrink_below=0.95,
                           budget_beta=0.9)
    losses = [1.0] * 4 + [2.0] * 3 + [0.5] * 3 + [0.25] * 3 + [0.1] * 3 + [0.1] * 3
    active = run(blocks, sched, len(losses), losses=losses)
    # end of step 3: EMA seeded with mean(steps 1..3) = 1.0
    # end of step 6: mean 2.0 > 1.05 * 1.0 -> budget +1 (3 blocks); EMA 1.1
    # end of step 9: mean 0.5 < 0.95 * 1.1 -> budget 0 (2 blocks); EMA 1.04
    # end of step 12: 0.25 < 0.95 * 1.04 -> budget -1 (1 block); EMA 0.961
    # end of step 15: 0.1 -> budget -2, clamped to min_active (1 block)
    assert active == [4, 2, 2, 4, 2, 2, 4, 3, 3, 4, 2, 2, 4, 1, 1, 4, 1, 1, 4]
    assert sched.budget == -3  # bounded by min_active - max_active = -3
    blocks, sched = manual(threshold=0.7, probe_every=3, min_active=2)
    active = run(blocks, sched, len(losses), losses=losses)
    assert min(active) == 2 and sched.budget == -2


def test_nonfinite_loss_grows_the_suffix():
    blocks, sched = manual(threshold=0.7, probe_every=2)
    active = run(blocks, sched, 5, losses=[1.0, 1.0, 1.0, math.nan, 1.0])
    assert active == [4, 2, 4, 2, 4] and sched.budget == 1 and sched.active == 3


def test_recovery_trains_every_block():
    blocks, sched = manual(threshold=0.7, probe_every=100, total_steps=20,
                           final_full_fraction=0.25)
    active = run(blocks, sched, 22)
    assert active == [4] + [2] * 14 + [4] * 7
    assert sched.phase == "recovery"
    assert all(b.weight.requires_grad for b in blocks)


# -- a real model, real backward ------------------------------------------------------------

def mlp(n=5, width=8):
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(n - 1)]
    blocks.append(nn.Linear(width, 1))
    return nn.Sequential(*blocks), blocks


def data(step, width=8):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, width, generator=g), torch.randn(16, 1, generator=g)


def train(model, sched, steps, start=0, set_to_none=True):
    out = []
    for i in range(start, start + steps):
        x, y = data(i)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        out.append(sched.active)
        sched.step(loss.detach())
        sched.zero_grad(set_to_none=set_to_none)
    return out


@pytest.mark.parametrize("set_to_none", [True, False])
def test_frozen_blocks_get_no_gradient_no_update_and_keep_state(set_to_none):
    model, blocks = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = BlockSchedule(opt, blocks, threshold=1.0, max_active=2, probe_every=5)
    train(model, sched, 1, set_to_none=set_to_none)  # one full step: AdamW state everywhere
    assert sched.active == 2
    front = [p for b in blocks[:3] for p in b.parameters()]
    before = [p.detach().clone() for p in front]
    head_before = [p.detach().clone() for p in blocks[4].parameters()]
    state = {id(p): copy.deepcopy(opt.state[p]) for p in front}

    outputs = []
    hooks_ = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in blocks]
    x, y = data(1)
    loss = nn.functional.mse_loss(model(x), y)
    for h in hooks_:
        h.remove()
    # autograd records nothing for the frozen front: backward stops at the first active block
    assert [o.requires_grad for o in outputs] == [False, False, False, True, True]
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in front)
    sched.step(loss.detach())
    sched.zero_grad(set_to_none=set_to_none)
    train(model, sched, 2, start=2, set_to_none=set_to_none)
    for p, b in zip(front, before):
        assert torch.equal(p.detach(), b)
        for key, v in state[id(p)].items():
            assert torch.equal(opt.state[p][key], v), key
    assert all(not torch.equal(p.detach(), b) for p, b in zip(blocks[4].parameters(),
                                                              head_before))
    # the probe step trains the front again, carrying its kept AdamW state forward
    train(model, sched, 2, start=4, set_to_none=set_to_none)
    for p, b in zip(front, before):
        assert not torch.equal(p.detach(), b)
        assert opt.state[p]["step"].item() == 2.0


def test_probe_step_gives_the_front_gradients():
    model, blocks = mlp()
    sched = BlockSchedule(torch.optim.SGD(model.parameters(), lr=0.1), blocks, threshold=1.0,
                          max_active=2, probe_every=3)
    got = []
    for i in range(7):
        x, y = data(i)
        nn.functional.mse_loss(model(x), y).backward()
        got.append(blocks[0][0].weight.grad is not None)
        sched.step()
        sched.zero_grad()
    assert got == [True, False, False, True, False, False, True]


def test_state_dict_round_trip():
    model, blocks = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    kw = {"threshold": 0.8, "probe_every": 4, "total_steps": 40, "stable_window": 3,
          "stable_rel_change": 0.5, "stable_cv": 1.0}
    sched = BlockSchedule(opt, blocks, **kw)
    train(model, sched, 8)
    flags = [p.requires_grad for p in model.parameters()]
    assert not all(flags)  # the checkpoint is taken with the front frozen
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": sched.state_dict()}, buf)
    ref_active = train(model, sched, 25, start=8)
    ref_weights = [p.detach().clone() for p in model.parameters()]

    model2, blocks2 = mlp()
    sched2 = BlockSchedule(torch.optim.AdamW(model2.parameters(), lr=1e-2), blocks2, **kw)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)  # the schedule state is plain data
    model2.load_state_dict(ck["model"])
    sched2.load_state_dict(ck["opt"])
    assert sched2.steps == 8 and sched2.relevance() == pytest.approx(ck["opt"]
                                                                     ["block_schedule"]["ema"]
                                                                     .tolist())
    assert [p.requires_grad for p in model2.parameters()] == flags
    assert train(model2, sched2, 25, start=8) == ref_active
    for p, q in zip(model2.parameters(), ref_weights):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    assert min(ref_active) < 5  # the run really froze blocks after the checkpoint


def test_state_dict_restores_requires_grad_and_rejects_other_block_counts():
    blocks, sched = manual(threshold=0.7)
    run(blocks, sched, 2)
    sd = sched.state_dict()
    blocks2, sched2 = manual(threshold=0.7)
    sched2.load_state_dict(sd)
    assert [b.weight.requires_grad for b in blocks2] == [False, False, True, True]
    assert sched2.active == 2 and sched2.phase == "open"
    _, other = manual(n=3)
    with pytest.raises(ValueError, match="for 4 blocks"):
        other.load_state_dict(sd)
    assert set(sd) == {"state", "param_groups", "block_schedule"}


def test_telemetry_relevance_active_gate_and_span():
    bus = hooks.Bus()
    rec = Recorder()
    bus.subscribe(rec, ["blocks/*", "time/blocks/*"])
    blocks, sched = manual(threshold=0.7, probe_every=3, total_steps=8,
                           final_full_fraction=0.25, bus=bus)
    for i in range(8):
        bus.begin_step(i)
        run(blocks, sched, 1)
        bus.end_step()
    rel = [e for e in rec.events if e.topic == "blocks/relevance" and e.step == 7]
    assert [e.param for e in rel] == ["block0", "block1", "block2", "block3"]
    np.testing.assert_allclose([e.value for e in rel], [0.5, 1.0, 1.5, 2.0], rtol=1e-6)
    assert rec.values("blocks/active") == [4, 2, 2, 4, 2, 2, 4, 4]
    gates = [(e.step, e.value.split(" ")[0]) for e in rec.events if e.topic == "blocks/gate"]
    assert gates == [(0, "warmup:"), (1, "open"), (6, "recovery:")]
    assert len(rec.values("time/blocks/select")) == 8
    assert all(v >= 0 for v in rec.values("time/blocks/select"))


def test_wraps_as_an_optimizer_for_schedulers_and_probe():
    import probe

    model, blocks = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = BlockSchedule(opt, blocks, threshold=0.9, probe_every=4, bus=hooks.Bus())
    assert sched.param_groups is opt.param_groups and sched.state is opt.state
    lr = torch.optim.lr_scheduler.StepLR(sched, step_size=2, gamma=0.5)
    rec = Recorder()
    planned = []
    with probe.attach(sched, model=model, every=1, collectors=[rec]):
        for i in range(4):
            planned.append(float(sched.active))
            x, y = data(i)
            nn.functional.mse_loss(model(x), y).backward()
            sched.step()
            sched.zero_grad()
            lr.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    topics = set(rec.topics())
    assert {"blocks/relevance", "blocks/active", "step/time_ms", "grad/norm"} <= topics
    assert rec.values("blocks/active") == planned
    assert planned[0] == 5 and min(planned) < 5
    assert copy.deepcopy(sched).active == sched.active


def test_closure_loss_is_used():
    model, blocks = mlp()
    sched = BlockSchedule(torch.optim.SGD(model.parameters(), lr=0.05), blocks,
                          stable_window=2, stable_rel_change=10.0, stable_cv=10.0)
    x, y = data(0)

    def closure():
        sched.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    outs = [sched.step(closure) for _ in range(5)]
    assert all(isinstance(o, torch.Tensor) for o in outs)
    assert sched.phase == "open"  # four losses filled two windows of 2


# -- invalid arguments ----------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    ({"beta": 1.0}, "beta"),
    ({"beta": -0.1}, "beta"),
    ({"threshold": 0.0}, "threshold"),
    ({"threshold": 1.01}, "threshold"),
    ({"min_active": 0}, "min_active"),
    ({"min_active": 5}, "min_active"),
    ({"min_active": 3, "max_active": 2}, "max_active"),
    ({"max_active": 5}, "max_active"),
    ({"freeze_after": -1}, "freeze_after"),
    ({"freeze_after": 0.5}, "total_steps"),
    ({"freeze_after": 1.5, "total_steps": 10}, "freeze_after"),
    ({"freeze_after": "10"}, "freeze_after"),
    ({"probe_every": 0}, "probe_every"),
    ({"total_steps": 0}, "total_steps"),
    ({"final_full_fraction": 1.0}, "final_full_fraction"),
    ({"stable_window": 1}, "stable_window"),
    ({"stable_rel_change": -1.0}, "stable_rel_change"),
    ({"stable_cv": -1.0}, "stable_cv"),
    ({"grow_above": 0.9}, "grow_above"),
    ({"shrink_below": 1.1}, "shrink_below"),
    ({"budget_beta": 1.0}, "budget_beta"),
    ({"eps": 0.0}, "eps"),
    ({"eps": math.inf}, "eps"),
    ({"eps": math.nan}, "eps"),
    ({"stable_cv": math.inf}, "stable_cv"),
    ({"stable_rel_change": math.inf}, "stable_rel_change"),
    ({"bus": "default"}, "bus"),
])
def test_invalid_arguments_raise(kw, match):
    blocks = [nn.Linear(2, 2) for _ in range(4)]
    params = [p for b in blocks for p in b.parameters()]
    with pytest.raises(ValueError, match=match):
        BlockSchedule(torch.optim.SGD(params, lr=0.1), blocks, **kw)
    assert all(p.requires_grad for p in params)


def test_invalid_blocks_and_optimizer_raise():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = torch.optim.SGD(list(a.parameters()) + list(b.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="optimizer"):
        BlockSchedule("sgd", [a, b])
    with pytest.raises(ValueError, match="at least one"):
        BlockSchedule(opt, [])
    with pytest.raises(ValueError, match="blocks"):
        BlockSchedule(opt, a)
    with pytest.raises(ValueError, match=r"blocks\[1\]"):
        BlockSchedule(opt, [a, "b"])
    with pytest.raises(ValueError, match="disjoint"):
        BlockSchedule(opt, [a, nn.Sequential(a)])
    with pytest.raises(ValueError, match="does not update"):
        BlockSchedule(opt, [a, nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="no parameter"):
        BlockSchedule(opt, [a, nn.ReLU()])
    with pytest.raises(ValueError, match="unique"):
        BlockSchedule(opt, [("x", a), ("x", b)])
    sched = BlockSchedule(opt, [("stem", a), ("head", b)])
    assert sched.block_names == ("stem", "head")
    with pytest.raises(ValueError, match="BlockSchedule"):
        BlockSchedule(sched, [a, b])
    before = a.weight.detach().clone()
    a.weight.grad = torch.ones_like(a.weight)
    with pytest.raises(ValueError, match="loss"):
        sched.step("0.5")
    assert torch.equal(a.weight, before) and sched.steps == 0


# -- CUDA: the steady suffix steps never synchronize with the host --------------------------

@pytest.mark.cuda
def test_cuda_suffix_steps_do_not_sync_and_relevance_matches_cpu():
    torch.manual_seed(0)
    model, blocks = mlp()
    cpu_rel = None
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        bl = list(m)
        sched = BlockSchedule(torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=True), bl,
                              threshold=0.6, probe_every=50, bus=hooks.Bus())
        x, y = data(0)
        x, y = x.to(device), y.to(device)
        nn.functional.mse_loss(m(x), y).backward()
        sched.step()
        sched.zero_grad()
        rel = sched.relevance()
        if device == "cpu":
            cpu_rel = rel
            continue
        np.testing.assert_allclose(rel, cpu_rel, rtol=1e-4)
        assert sched.active < 5
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(5):
                loss = nn.functional.mse_loss(m(x), y)
                loss.backward()
                sched.step(loss.detach())
                sched.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_demo_runs_the_block_schedule(tmp_path, capsys):

    from probe.cli import main

    rc = main(["demo", "--optimizer", "blocks", "--steps", "30", "--every", "5",
               "--runs", str(tmp_path), "--name", "t", "--no-progress"])
    assert rc == 0 and "blocks" in capsys.readouterr().out
    recs = read_events(tmp_path / "t-blocks" / "events.jsonl")[0]
    active = [r["value"] for r in recs if r["topic"] == "blocks/active"]
    assert active[0] == 4 and min(active) < 4  # the front froze after the warm-up
    assert {r["tags"]["param"] for r in recs if r["topic"] == "blocks/relevance"} == \
        {"block0", "block1", "block2", "block3"}
    assert [r["value"].split(" ")[0] for r in recs if r["topic"] == "blocks/gate"] == \
        ["warmup:", "open", "recovery:"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_relevance_in_any_float_dtype_matches_a_float64_reference(dtype):
    # float64 models crashed at step 1 (torch refuses to narrow float64 norms to float32)
    torch.manual_seed(0)
    blocks = [nn.Linear(4, 4).to(dtype) for _ in range(3)]
    opt = torch.optim.SGD([p for b in blocks for p in b.parameters()], lr=0.0)
    sched = BlockSchedule(opt, blocks, beta=0.0)
    for b in blocks:
        for p in b.parameters():
            p.grad = torch.randn_like(p)
    want = []
    for b in blocks:
        g = np.sqrt(sum(np.sum(p.grad.double().numpy() ** 2) for p in b.parameters()))
        w = np.sqrt(sum(np.sum(p.detach().double().numpy() ** 2) for p in b.parameters()))
        want.append(g / (w + sched.eps))
    sched.step()
    rtol = 1e-6 if dtype is torch.float64 else 1e-2
    np.testing.assert_allclose(sched.relevance(), want, rtol=rtol)


def test_a_step_without_any_gradient_changes_nothing():
    # the probe's skip hides every gradient: the schedule must not count, plan or measure
    blocks, sched = manual(freeze_after=2, probe_every=3, threshold=0.5)
    run(blocks, sched, 1)
    before = (sched.steps, sched.active, sched.relevance(), sched.state_dict())
    sched.zero_grad()
    assert sched.step(1.0) is None
    after = (sched.steps, sched.active, sched.relevance(), sched.state_dict())
    assert before[:2] == after[:2]
    np.testing.assert_array_equal(before[2], after[2])
    assert repr(before[3]) == repr(after[3])


@pytest.mark.parametrize("set_to_none", [True, False])
def test_update_statistics_on_every_step_with_frozen_blocks(set_to_none):
    """Steps with frozen blocks still report update/norm (total and per trained tensor),
    whether zero_grad leaves None or zeros."""
    import probe
    from tests.helpers import Recorder

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                          nn.Linear(6, 2))
    bus = hooks.Bus()
    sched = BlockSchedule(torch.optim.AdamW(model.parameters(), lr=1e-2),
                          [model[0], model[2], model[4]], threshold=0.5, probe_every=2,
                          total_steps=12, bus=bus)
    rec = Recorder()
    with probe.attach(sched, model=model, every=1, collectors=[rec], bus=bus):
        for _ in range(12):
            model(torch.randn(8, 6)).square().mean().backward()
            sched.step()
            sched.zero_grad(set_to_none=set_to_none)
    active = {e.step: e.value for e in rec.events if e.topic == "blocks/active"}
    assert any(v < 3 for v in active.values())  # some steps froze blocks
    totals = [e.step for e in rec.events if e.topic == "update/norm" and not e.tags]
    assert totals == list(range(12))
    last = [e.step for e in rec.events if e.topic == "update/norm" and e.param == "4.weight"]
    assert last == list(range(12))  # the trailing block trains on every step
