"""Probe lifecycle: isolation between probes, atomic attach, detach == close, interrupted
steps, attach from inside a step, p.log values."""

import math
import os
import threading

import numpy as np
import pytest
import torch
from torch import nn

import probe
from optimizers import Muon
from tests.helpers import Recorder


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _step(model, opt, seed=0):
    torch.manual_seed(seed)
    model(torch.randn(3, 4)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def test_two_probes_in_one_process_see_only_their_own_optimizer():
    g, d = _model(0), _model(1)
    opt_g, opt_d = torch.optim.SGD(g.parameters(), lr=0.1), Muon(d.parameters(), lr=0.02)
    rg, rd = Recorder(), Recorder()
    with probe.attach(opt_g, model=g, every=1, collectors=[rg]), \
            probe.attach(opt_d, model=d, every=2, collectors=[rd]):
        for i in range(4):
            _step(g, opt_g, i)
            _step(d, opt_d, i)
    names_g = {e.param for e in rg.events if e.topic == "grad/norm" and e.param}
    names_d = {e.param for e in rd.events if e.topic == "grad/norm" and e.param}
    assert names_g == {n for n, _ in g.named_parameters()} == names_d
    assert [e.step for e in rg.events if e.topic == "grad/norm" and e.param is None] == \
        [0, 1, 2, 3]
    assert [e.step for e in rd.events if e.topic == "grad/norm" and e.param is None] == [0, 2]
    assert not any(e.topic.startswith("muon/") for e in rg.events)


def test_a_second_probe_on_one_optimizer_is_refused_and_detach_frees_it():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    p = probe.attach(opt, collectors=[])
    with pytest.raises(ValueError, match="already has a probe"):
        probe.attach(opt, collectors=[])
    p.detach()
    probe.attach(opt, collectors=[]).close()


def test_a_failing_attach_leaves_nothing_behind():
    class Half(torch.optim.SGD):
        def register_load_state_dict_pre_hook(self, *a, **k):
            raise AttributeError("_optimizer_load_state_dict_pre_hooks")

    m = _model()
    opt = Half(m.parameters(), lr=0.1)
    rec = Recorder()
    with pytest.raises(AttributeError):
        probe.attach(opt, collectors=[rec])
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert not opt._optimizer_state_dict_post_hooks and rec.closed
    _step(m, opt)
    assert rec.events == []
    probe.attach(opt.__class__.__mro__[1](m.parameters(), lr=0.1), collectors=[]).close()


def test_a_wrapper_that_steps_an_inner_optimizer_is_refused_with_a_pointer():
    class Lookahead:  # pytorch-optimizer's shape: an Optimizer that skipped Optimizer.__init__
        pass

    m = _model()
    inner = torch.optim.SGD(m.parameters(), lr=0.1)
    wrapper = torch.optim.Optimizer.__new__(type("Lookahead", (torch.optim.Optimizer,), {}))
    wrapper.optimizer = inner
    wrapper.param_groups = inner.param_groups
    with pytest.raises(ValueError, match=r"attach to the inner optimizer.*opt\.optimizer"):
        probe.attach(wrapper, collectors=[])
    assert not inner._optimizer_step_pre_hooks


def test_detach_releases_threads_files_and_subscriptions(tmp_path):
    m = _model()
    opt = Muon(m.parameters(), lr=0.02)
    threads = threading.active_count()
    fds = len(os.listdir("/proc/self/fd"))
    for i in range(30):
        p = probe.attach(opt, model=m, logdir=tmp_path / f"r{i % 3}", every=1)
        _step(m, opt, i)
        p.detach()
    assert threading.active_count() <= threads + 1
    assert len(os.listdir("/proc/self/fd")) <= fds + 1
    assert opt.bus.subscriptions == ()


def test_a_skipped_step_that_raises_never_undoes_the_next_clean_step():
    m, twin = _model(), _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    _step(twin, twin_opt, 0)
    _step(twin, twin_opt, 2)

    def interrupt(optimizer, args, kwargs):
        if interrupt.armed:
            interrupt.armed = False
            raise KeyboardInterrupt

    interrupt.armed = False
    with probe.attach(opt, model=m, every=1, collectors=[], on_nonfinite="skip"):
        _step(m, opt, 0)
        m(torch.randn(3, 4)).sum().backward()
        m[0].weight.grad[0, 0] = math.nan
        interrupt.armed = True
        handle = opt.register_step_pre_hook(interrupt)  # after the probe's: it raises in-step
        with pytest.raises(KeyboardInterrupt):
            opt.step()
        handle.remove()
        opt.zero_grad()
        _step(m, opt, 2)
    for a, b in zip(m.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_the_probe_lets_a_steps_gradients_go_when_the_step_ends():
    """The probe holds the step's gradient list through the step (the optimizer's own p.grad
    reads then reuse its tensors), never past it: set_to_none frees them as without it."""
    import gc
    import weakref

    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)

    def interrupt(optimizer, args, kwargs):
        raise KeyboardInterrupt

    with probe.attach(opt, model=m, every=3, collectors=[Recorder()]) as p:
        for k in range(4):  # sampled steps (0, 3) and unsampled ones
            m(torch.randn(3, 4)).sum().backward()
            refs = [weakref.ref(q.grad) for q in m.parameters()]
            opt.step()
            opt.zero_grad(set_to_none=True)
            gc.collect()
            assert [r() for r in refs] == [None] * len(refs), k
        m(torch.randn(3, 4)).sum().backward()
        refs = [weakref.ref(q.grad) for q in m.parameters()]
        handle = opt.register_step_pre_hook(interrupt)  # after the probe's: it raises in-step
        with pytest.raises(KeyboardInterrupt):
            opt.step()
        handle.remove()
        opt.zero_grad(set_to_none=True)
        p.close()  # the interrupted step is closed here
        gc.collect()
        assert [r() for r in refs] == [None] * len(refs)

def test_attach_from_inside_a_step_starts_at_the_next_step():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    made = []
    rec = Recorder()

    def attach_now(optimizer, args, kwargs):
        if not made:
            made.append(probe.attach(optimizer, every=1, collectors=[rec]))

    h = opt.register_step_pre_hook(attach_now)
    _step(m, opt, 0)  # the probe is born inside this step
    h.remove()
    _step(m, opt, 1)
    made[0].close()
    assert sorted({e.step for e in rec.events if e.topic == "grad/norm"}) == [0]
    assert made[0].step == 1


def test_paused_steps_are_neither_observed_nor_counted_and_the_count_resumes():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    rec = Recorder()
    p = probe.attach(opt, every=1, collectors=[rec])
    _step(m, opt, 0)
    with p.paused():
        with p.paused():  # nested: the outer pause holds after the inner one ends
            _step(m, opt, 1)
        _step(m, opt, 2)
    _step(m, opt, 3)
    p.close()
    assert p.step == 2
    assert sorted({e.step for e in rec.events if e.topic == "grad/norm"}) == [0, 1]
    assert sum(1 for e in rec.events if e.topic == "step/time_ms") == 2
    with pytest.raises(RuntimeError, match="closed"):
        with p.paused():
            pass


def test_pausing_inside_a_step_lets_that_step_finish_as_observed():
    m = _model()
    opt = torch.optim.LBFGS(m.parameters(), lr=0.1, max_iter=2)
    rec = Recorder()
    p = probe.attach(opt, every=1, collectors=[rec])
    x = torch.randn(3, 4)

    def closure():
        opt.zero_grad()
        loss = m(x).square().mean()
        loss.backward()
        return loss

    def pausing_closure():
        with p.paused():
            return closure()

    opt.step(pausing_closure)
    opt.step(closure)
    p.close()
    assert p.step == 2
    assert sorted({e.step for e in rec.events if e.topic == "grad/norm"}) == [0, 1]


@pytest.mark.parametrize("value,expected", [
    (np.float32(1.5), 1.5), (np.int64(3), 3.0), (np.mean([1.0, 2.0]), 1.5),
    (np.array(2.0), 2.0), (True, 1.0), (7, 7.0), (torch.tensor(0.25), 0.25)])
def test_log_takes_every_real_number_as_a_number(value, expected):
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    rec = Recorder()
    with probe.attach(opt, collectors=[rec]) as p:
        p.log("user/x", value)
        _step(m, opt)
    assert rec.values("user/x") == [expected]


@pytest.mark.parametrize("value", [10**400, [1, "a"], "abc", torch.ones(2), 1 + 2j, None])
def test_log_refuses_a_bad_value_at_the_call(value):
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with probe.attach(opt, collectors=[Recorder()]) as p:
        with pytest.raises(ValueError, match="user/x"):
            p.log("user/x", value)
        _step(m, opt)  # the step is unharmed


@pytest.mark.parametrize("kwargs,match", [
    ({"logdir": ""}, "logdir"), ({"collectors": Recorder()}, "collectors"),
    ({"gpu": 1}, "gpu"), ({"every": True}, "every"), ({"collectors": "tb"}, "collectors")])
def test_attach_refuses_bad_arguments_before_any_work(kwargs, match):
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        probe.attach(opt, **kwargs)
    assert not opt._optimizer_step_pre_hooks


def test_each_json_line_names_its_run(tmp_path):
    from dashboards import read_events

    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with probe.attach(opt, logdir=tmp_path, every=1) as p:
        _step(m, opt)
    good, bad = read_events(tmp_path / "events.jsonl")
    assert good and not bad and {r["run"] for r in good} == {p.run_id}


def test_two_probes_write_disjoint_event_files_with_their_own_counts(tmp_path):
    from dashboards import read_events

    g, d = _model(0), _model(1)
    opt_g, opt_d = torch.optim.SGD(g.parameters(), lr=0.1), Muon(d.parameters(), lr=0.02)
    with probe.attach(opt_g, model=g, every=1, logdir=tmp_path / "g") as pg, \
            probe.attach(opt_d, model=d, every=2, logdir=tmp_path / "d") as pd:
        for i in range(6):
            _step(g, opt_g, i)
            _step(d, opt_d, i)
            pg.log("train/loss", float(i))
    recs = {k: read_events(tmp_path / k / "events.jsonl")[0] for k in ("g", "d")}
    totals = {k: [r["step"] for r in v if r["topic"] == "grad/norm" and not r["tags"]]
              for k, v in recs.items()}
    assert totals == {"g": [0, 1, 2, 3, 4, 5], "d": [0, 2, 4]}
    assert len([r for r in recs["g"] if r["topic"] == "train/loss"]) == 6
    assert not [r for r in recs["d"] if r["topic"] == "train/loss"]
    assert {r["run"] for r in recs["g"]} == {pg.run_id} != {pd.run_id} == \
        {r["run"] for r in recs["d"]}
    assert not any(r["topic"].startswith("muon/") for r in recs["g"])


def test_attaching_to_an_optimizer_with_state_warns_that_steps_count_from_zero(capsys):
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    _step(m, opt)  # state exists (as after loading a checkpoint before attach)
    with probe.attach(opt, collectors=[Recorder()]) as p:
        _step(m, opt)
    assert p.step == 1
    assert "already has state" in capsys.readouterr().err


def test_a_second_live_process_on_one_logdir_is_warned_about_and_its_lock_left(tmp_path, capsys):
    import json
    import subprocess
    import sys

    from probe.runlock import LOCK

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"pid": other.pid, "run": "theirs"}))
        m = _model()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        with probe.attach(opt, logdir=tmp_path, every=1) as p:
            _step(m, opt)
        err = capsys.readouterr().err
        assert f"also being written by process {other.pid}" in err and p.run_id in err
    finally:
        other.kill()
        other.wait()
    # a dead holder is no warning, and our claim is gone after close
    (tmp_path / LOCK).write_text(json.dumps({"pid": other.pid, "run": "theirs"}))
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    with probe.attach(opt, logdir=tmp_path, every=1):
        pass
    assert "also being written" not in capsys.readouterr().err
    assert not (tmp_path / LOCK).exists()
