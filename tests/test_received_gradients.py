"""Gradient statistics describe the gradient the optimizer received, whatever step() does
with .grad afterwards: rewritten in place (schedule-free, gradient centralization), dropped
(heavyball's p.grad = None) or replaced."""

import math

import pytest
import torch
from torch import nn

import probe
from tests.helpers import Recorder


class Centralizing(torch.optim.SGD):
    """SGD after gradient centralization done in place on .grad, as Ranger does."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.dim() > 1:
                    p.grad.sub_(p.grad.mean(dim=1, keepdim=True))
        return super().step(closure)


class Dropping(torch.optim.SGD):
    """SGD that frees each gradient inside step(), as heavyball does."""

    def step(self, closure=None):
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        return out


class LateRewriter(torch.optim.SGD):
    """Leaves .grad alone for its first steps, then scales it in place."""

    def step(self, closure=None):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls > 2:
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad.mul_(3.0)
        return super().step(closure)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _run(kind, steps=5, probed=True):
    model = _model()
    opt = kind(model.parameters(), lr=0.1)
    names = [n for n, _ in model.named_parameters()]
    rec = Recorder()
    received, before, after = [], [], []
    p = probe.attach(opt, model=model, every=1, collectors=[rec]) if probed else None
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        model(torch.randn(8, 6, generator=g)).square().mean().backward()
        received.append([q.grad.detach().double().clone() for q in model.parameters()])
        before.append([q.detach().double().clone() for q in model.parameters()])
        opt.step()
        after.append([q.detach().double().clone() for q in model.parameters()])
        opt.zero_grad()
    if p is not None:
        p.close()
    return model, rec, names, received, before, after


@pytest.mark.parametrize("kind", [Centralizing, Dropping, LateRewriter, torch.optim.SGD])
def test_statistics_are_of_the_received_gradient(kind):
    """Exact on every step; the one exception: an optimizer that keeps .grad on the first
    sampled step (so the probe stops copying it) and rewrites it later shows NaN for that
    first rewrite's gradient statistics, and is copied, hence exact, from then on."""
    torch.optim.SGD([nn.Parameter(torch.zeros(1))])  # torch hooks SGD.step too: nested calls
    model, rec, names, received, before, after = _run(kind)
    unknown = {2} if kind is LateRewriter else set()
    plain, *_ = _run(kind, probed=False)
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)  # the probe changes nothing
    for i, name in enumerate(names):
        gn = rec.values("grad/norm", name)
        un = rec.values("update/norm", name)
        cos = rec.values("update/cos_grad", name)
        assert len(gn) == len(un) == len(cos) == 5, (kind.__name__, name)
        for s in range(5):
            g, u = received[s][i], after[s][i] - before[s][i]
            assert un[s] == pytest.approx(u.norm().item(), rel=1e-5)
            if s in unknown:
                assert math.isnan(gn[s]) and math.isnan(cos[s])
                continue
            assert gn[s] == pytest.approx(g.norm().item(), rel=1e-5)
            want = (-(u * g).sum() / (u.norm() * g.norm())).item()
            assert cos[s] == pytest.approx(want, rel=1e-4, abs=1e-6)
    totals = [e.value for e in rec.events if e.topic == "grad/norm" and not e.tags]
    want = [math.nan if s in unknown else torch.sqrt(sum(g.square().sum() for g in step)).item()
            for s, step in enumerate(received)]
    assert totals == pytest.approx(want, rel=1e-5, nan_ok=True)
    assert [e.step for e in rec.events if e.topic == "step/time_ms"] == list(range(5))


def test_an_optimizer_that_keeps_the_gradient_is_not_copied_after_the_first_sample():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with probe.attach(opt, model=model, every=1, collectors=[Recorder()]) as p:
        for _ in range(3):
            model(torch.randn(4, 6)).square().mean().backward()
            opt.step()
            assert p._copy_grads is False  # known after the first sampled step
            opt.zero_grad()
    model = _model()
    opt = Centralizing(model.parameters(), lr=0.1)
    with probe.attach(opt, model=model, every=1, collectors=[Recorder()]) as p:
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
        assert p._copy_grads is True


# -- closures: the gradient comes from the closure, called inside step() -------------------

def _lbfgs_run(probed, on_nonfinite="report", nan_at=None, steps=4):
    model = _model()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    rec = Recorder()
    first_grads, calls = [], []
    p = probe.attach(opt, model=model, every=1, collectors=[rec],
                     on_nonfinite=on_nonfinite) if probed else None
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    for s in range(steps):
        calls.append(0)

        def closure(s=s):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            if s == nan_at:
                model[0].weight.grad[0, 0] = math.nan
            if calls[-1] == 0:
                first_grads.append([q.grad.detach().double().clone()
                                    for q in model.parameters()])
            calls[-1] += 1
            return loss

        opt.step(closure)
    if p is not None:
        p.close()
    return model, rec, first_grads, calls


def test_lbfgs_statistics_are_of_the_first_closure_evaluation():
    model, rec, first, calls = _lbfgs_run(True)
    plain, _, _, plain_calls = _lbfgs_run(False)
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    assert calls == plain_calls and max(calls) > 1  # line search: several evaluations
    got = rec.values("grad/norm", "0.weight")
    assert got == pytest.approx([g[0].norm().item() for g in first], rel=1e-5)
    assert len(rec.values("update/norm", "0.weight")) == 4  # step 0 included


def test_lbfgs_nonfinite_is_reported_and_skipped_on_its_own_step():
    model, rec, _, _ = _lbfgs_run(True, on_nonfinite="skip", nan_at=2)
    flagged = [e.step for e in rec.events if e.topic == "anomaly/nonfinite"
               and e.tags.get("param") == "0.weight" and e.value]
    skipped = [e.step for e in rec.events if e.topic == "anomaly/skipped_step" and e.value]
    assert flagged == [2] and skipped == [2]
    assert all(torch.isfinite(q).all() for q in model.parameters())
    ref = _model()  # steps 0, 1 and 3 of a run whose step 2 did nothing
    opt = torch.optim.LBFGS(ref.parameters(), lr=0.5, max_iter=4)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))

    def closure():
        opt.zero_grad()
        loss = ref(x).square().mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_a_closure_passed_by_keyword_is_checked_too():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder()
    x = torch.randn(8, 6)
    seen = []

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        seen.append(model[0].weight.grad.double().norm().item())
        return loss

    with probe.attach(opt, model=model, every=1, collectors=[rec]):
        for _ in range(3):
            opt.step(closure=closure)
    assert rec.values("grad/norm", "0.weight") == pytest.approx(seen, rel=1e-5)


# -- GradScaler: one step numbering for fused and non-fused, unscaled statistics -----------

def _scaled_run(fused, overflow_at=(2, 5), steps=8):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    rec = Recorder()
    received = []
    with probe.attach(opt, model=model, every=1, collectors=[rec]) as p:
        for s in range(steps):
            g = torch.Generator().manual_seed(s)
            scaler.scale(model(torch.randn(8, 6, generator=g)).square().mean()).backward()
            if s in overflow_at:
                model[0].weight.grad[0, 0] = math.inf
            else:
                received.append(model[0].weight.grad.double() / scaler.get_scale())
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    return model, p, rec, received


def test_grad_scaler_steps_count_alike_fused_or_not_and_norms_are_unscaled():
    runs = {fused: _scaled_run(fused) for fused in (False, True)}
    for fused, (_, p, rec, received) in runs.items():
        assert p.step == 6, fused  # the two overflow steps are not steps
        assert p.scaler_skipped_steps == (2 if fused else 0)
        assert not [e for e in rec.events if e.topic == "anomaly/nonfinite" and e.value]
        got = rec.values("grad/norm", "0.weight")
        assert got == pytest.approx([g.norm().item() for g in received], rel=1e-5), fused
    a, b = runs[False][0], runs[True][0]
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y)  # fused and for-loop AdamW: rounding apart
    assert runs[False][2].values("update/cos_grad", "0.weight") == pytest.approx(
        runs[True][2].values("update/cos_grad", "0.weight"), rel=1e-4, abs=1e-6)
