"""probe.attach on a plain torch optimizer: hooks, statistics, anomalies, logging."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import hooks
import probe
from tests.helpers import Recorder


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def _train_step(model, opt, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 4, generator=g)
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def test_statistics_match_a_hand_computation():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0)
    rec = Recorder()
    with probe.attach(opt, model=model, every=1, collectors=[rec], bus=hooks.Bus()):
        x = torch.randn(8, 4)
        model(x).square().mean().backward()
        before = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
        grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        opt.step()
        after = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    for name in before:
        g, w = grads[name].ravel(), before[name].ravel()
        u = (after[name] - before[name]).ravel()
        assert rec.values("grad/norm", name) == [pytest.approx(np.linalg.norm(g), rel=1e-5)]
        assert rec.values("param/norm", name) == [pytest.approx(np.linalg.norm(w), rel=1e-5)]
        assert rec.values("update/norm", name) == [pytest.approx(np.linalg.norm(u), rel=1e-4)]
        assert rec.values("update/ratio", name) == [
            pytest.approx(np.linalg.norm(u) / np.linalg.norm(w), rel=1e-4)]
        cos = np.dot(-u, g) / (np.linalg.norm(u) * np.linalg.norm(g))
        assert rec.values("update/cos_grad", name) == [pytest.approx(cos, abs=1e-4)]
        assert cos == pytest.approx(1.0, abs=1e-4)  # plain SGD moves along -grad
    total = np.sqrt(sum(np.sum(v ** 2) for v in grads.values()))
    assert rec.values("grad/norm") == [pytest.approx(total, rel=1e-5)]
    assert len(rec.values("step/time_ms")) == 1


def test_sampling_every_n_steps():
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    rec = Recorder()
    with probe.attach(opt, model=model, every=3, collectors=[rec], bus=hooks.Bus()) as p:
        for s in range(7):
            _train_step(model, opt, s)
    assert p.step == 7
    assert sorted({e.step for e in rec.events if e.topic == "grad/norm"}) == [0, 3, 6]


def test_detach_leaves_the_optimizer_as_before():
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    p = probe.attach(opt, model=model, every=1, collectors=[], bus=hooks.Bus())
    assert len(opt._optimizer_step_pre_hooks) == 1 and len(opt._optimizer_step_post_hooks) == 1
    _train_step(model, opt)
    sched.step()
    assert isinstance(opt, torch.optim.AdamW)
    assert "state" in opt.state_dict()
    p.detach()
    assert len(opt._optimizer_step_pre_hooks) == 0
    assert len(opt._optimizer_step_post_hooks) == 0
    p.close()


def test_nan_gradient_raises_anomaly_on_an_unsampled_step():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder()
    with probe.attach(opt, model=model, every=100, collectors=[rec], bus=hooks.Bus()):
        _train_step(model, opt, 0)  # step 0: sampled, clean
        model(torch.randn(2, 4)).sum().backward()
        model[2].weight.grad[0, 0] = float("nan")
        opt.step()  # step 1: unsampled, but the alarm fires
        opt.zero_grad()
    fired = [e for e in rec.events if e.topic == "anomaly/nonfinite" and e.step == 1]
    assert {e.tags.get("param"): e.value for e in fired} == {"2.weight": 1.0, None: 1.0}
    assert rec.values("anomaly/nonfinite")[0] == 0.0  # step 0 reports a clean total


class _Sanitizing(torch.optim.SGD):
    """An SGD that rewrites NaN gradients to 0 in place before stepping, as some
    third-party optimizers clean their inputs."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.nan_to_num_(0.0)
        return super().step(closure)


@pytest.mark.parametrize("make", [torch.optim.SGD, _Sanitizing], ids=["sgd", "rewrites"])
def test_a_sampled_step_names_nan_gradients_from_its_own_norms(monkeypatch, make):
    """On a sampled step the finiteness check reads the gradient norms the statistics take
    after the step, not a pass of its own, and names the gradients as the optimizer received
    them, also when it rewrites them in place (they are copied)."""
    from probe.stats import FiniteCheck

    passes = []
    real = FiniteCheck.all_finite
    monkeypatch.setattr(FiniteCheck, "all_finite",
                        lambda self, grads: passes.append(len(grads)) or real(self, grads))
    model = _model()
    opt = make(model.parameters(), lr=0.1)
    rec = Recorder()
    with probe.attach(opt, model=model, every=2, collectors=[rec], bus=hooks.Bus()):
        for step in range(3):
            model(torch.randn(2, 4)).sum().backward()
            if step == 2:
                model[0].bias.grad[1] = float("nan")
            opt.step()
            opt.zero_grad()
    assert passes == [4]  # the unsampled step 1 only
    fired = {e.tags.get("param"): e.value for e in rec.events
             if e.topic == "anomaly/nonfinite" and e.step == 2}
    assert fired == {"0.bias": 1.0, None: 1.0}
    assert bool(torch.isfinite(model[0].bias).all()) == (make is _Sanitizing)
    assert math.isnan(rec.values("grad/norm", "0.bias")[-1])  # as received


def test_log_resolves_tensors_with_the_step_batch():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder()
    bus = hooks.Bus()
    with probe.attach(opt, model=model, every=5, collectors=[rec], bus=bus) as p:
        for s in range(3):
            loss = _train_step(model, opt, s)
            p.log("train/loss", loss)
        p.log("eval/accuracy", 0.5)
        p.log("user/lr", 0.1)
        with pytest.raises(ValueError, match="topic"):
            p.log("not/a_topic", 1.0)
    assert len(rec.values("train/loss")) == 3
    assert rec.values("eval/accuracy") == [0.5] and rec.values("user/lr") == [0.1]
    s = p.summary()
    assert s["train/loss"]["count"] == 3
    assert s["train/loss"]["min"] <= s["train/loss"]["mean"] <= s["train/loss"]["max"]


def test_names_from_named_param_groups_and_fallback():
    w, b = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([("enc.w", w), ("enc.b", b)], lr=0.1)
    rec = Recorder()
    with probe.attach(opt, every=1, collectors=[rec], bus=hooks.Bus()):
        (w.sum() + b.sum()).backward()
        opt.step()
    assert {e.tags["param"] for e in rec.events if e.topic == "grad/norm" and e.tags} == \
        {"enc.w", "enc.b"}
    opt2 = torch.optim.SGD([w, b], lr=0.1)
    rec2 = Recorder()
    with probe.attach(opt2, every=1, collectors=[rec2], bus=hooks.Bus()):
        (w.sum() + b.sum()).backward()
        opt2.step()
    assert {e.tags["param"] for e in rec2.events if e.topic == "grad/norm" and e.tags} == \
        {"group0.0:3x2", "group0.1:3"}


def test_given_bus_gets_the_default_collectors(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    bus = hooks.Bus()
    with probe.attach(opt, model=model, logdir=tmp_path, every=1, bus=bus):
        # the file writers run on workers of their own (Background), off the training thread
        assert {type(getattr(s.collector, "collector", s.collector)).__name__
                for s in bus.subscriptions} == {"Summary", "TensorBoard", "JSONLines"}
        assert {type(s.collector).__name__ for s in bus.subscriptions} == \
            {"Summary", "Background"}
        _train_step(model, opt)
    assert bus.subscriptions == ()
    assert (tmp_path / "events.jsonl").stat().st_size > 0


def test_collector_failure_never_breaks_training():
    class Broken:
        def handle(self, events):
            raise RuntimeError("boom")

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder()
    bus = hooks.Bus()
    with probe.attach(opt, model=model, every=1, collectors=[Broken(), rec], bus=bus):
        for s in range(3):
            _train_step(model, opt, s)
    assert bus.collector_errors >= 3
    assert len({e.step for e in rec.events if e.topic == "grad/norm"}) == 3


@pytest.mark.parametrize("kwargs,match", [
    ({"every": 0}, "every"), ({"gpu": "yes"}, "gpu"), ({"model": 3}, "model"),
    ({"collectors": [object()]}, "collectors"), ({"profile": "on"}, "profile"),
])
def test_bad_arguments_raise_before_any_work(kwargs, match):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        probe.attach(opt, **kwargs)
    assert len(opt._optimizer_step_pre_hooks) == 0


def test_non_optimizer_is_rejected():
    with pytest.raises(ValueError, match="optimizer"):
        probe.attach(object())


def test_optimizer_with_its_own_bus_rejects_another():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.bus = hooks.Bus()
    with pytest.raises(ValueError, match="bus"):
        probe.attach(opt, bus=hooks.Bus())
    with probe.attach(opt, collectors=[]) as p:
        assert p.bus is opt.bus


def test_nonfinite_check_leaves_gradients_bit_identical_and_names_culprits():
    from probe.stats import FiniteCheck

    nonfinite_mask = FiniteCheck().mask  # one check, reused: its kept flag must not stick
    tiny = torch.finfo(torch.float32).tiny
    special = torch.tensor([-0.0, tiny / 4, -tiny / 8, 3.0e38, 1e30, -1e-30, 1.5])
    grads = [special.clone(), torch.randn(3, 4), torch.randn(5).to(torch.float64)]
    before = [g.clone() for g in grads]
    assert nonfinite_mask(grads) == [False, False, False]
    for g, b in zip(grads, before):  # every bit, signed zero and subnormals included
        assert torch.equal(g.view(torch.uint8) if g.dtype != torch.float64 else g,
                           b.view(torch.uint8) if b.dtype != torch.float64 else b)
        assert torch.equal(torch.signbit(g), torch.signbit(b))
    grads[1][2, 3] = float("nan")
    grads[2][0] = float("-inf")
    assert nonfinite_mask(grads) == [False, True, True]
    assert torch.isnan(grads[1][2, 3]) and grads[2][0] == float("-inf")


def test_histograms_sample_the_gradient_and_the_applied_update():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    rec = Recorder()
    with probe.attach(opt, model=model, every=1, collectors=[rec], bus=hooks.Bus()):
        model(torch.randn(8, 4)).square().mean().backward()
        before = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
        grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        opt.step()  # step 0: a histogram step
    for name, p in model.named_parameters():
        update = p.detach().numpy().ravel() - before[name].ravel()
        np.testing.assert_allclose(rec.values("update/hist", name)[0], update, atol=1e-7)
        np.testing.assert_allclose(rec.values("grad/hist", name)[0], grads[name].ravel())
        assert np.abs(update).max() > 1e-3  # AdamW moved every parameter


@pytest.mark.cuda
def test_cuda_probe_statistics_without_a_sync():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = Recorder()
    x = torch.randn(8, 32, device="cuda")
    with probe.attach(opt, model=model, every=1, collectors=[rec], bus=hooks.Bus()):
        model(x).square().mean().backward()
        before = {n: p.detach().cpu().double() for n, p in model.named_parameters()}
        grads = {n: p.grad.detach().cpu().double() for n, p in model.named_parameters()}
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()  # statistics, non-finite flags and the batch copy stay asynchronous
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for name, p in model.named_parameters():
        u = p.detach().cpu().double() - before[name]
        assert rec.values("update/norm", name)[0] == pytest.approx(u.norm().item(), rel=1e-4)
        assert rec.values("grad/norm", name)[0] == pytest.approx(grads[name].norm().item(),
                                                                 rel=1e-5)
        cos = (-u.flatten() @ grads[name].flatten()) / (u.norm() * grads[name].norm())
        assert rec.values("update/cos_grad", name)[0] == pytest.approx(cos.item(), abs=1e-4)
