"""Faults the probe must survive: failing collectors, SIGKILL, exceptions, NaN/Inf, bad input."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import hooks
import probe
from dashboards import JSONLines, TensorBoard, event_writer, read_events
from probe.names import safe_name
from tests.helpers import Recorder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    model(torch.randn(8, 4, generator=g)).square().mean().backward()
    opt.step()
    opt.zero_grad()


class Raising:
    name = "Raising"

    def handle(self, events):
        raise RuntimeError("collector bug")


def _broken_collector(kind, tmp_path):
    if kind == "raises":
        return Raising()
    if kind == "enospc":
        return JSONLines("/dev/full")  # the kernel answers every write with ENOSPC
    # a folder gone read-only under the run (a remount): the kernel refuses the writes
    j = JSONLines(tmp_path / "events.jsonl")
    j._file.close()
    j._file = open(os.open(j.path, os.O_RDONLY), "ab", buffering=0)  # noqa: SIM115
    return j


@pytest.mark.parametrize("broken", ["raises", "enospc", "readonly"])
def test_failing_collector_is_isolated_counted_and_reported_once(broken, capsys, tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder()
    bad = _broken_collector(broken, tmp_path)
    bus = hooks.Bus()
    with probe.attach(opt, model=model, every=1, collectors=[bad, rec], bus=bus):
        for s in range(5):
            _step(model, opt, s)
    assert sorted({e.step for e in rec.events if e.topic == "grad/norm"}) == [0, 1, 2, 3, 4]
    assert len(rec.values("grad/norm", "0.weight")) == 5  # the good collector kept everything
    # one failure per step, one more when close() flushes the error count itself to it
    assert bus.collector_errors == 6
    errs = rec.values("probe/collector_errors")
    assert errs == [1.0, 2.0, 3.0, 4.0, 5.0]  # counted as they happen, delivered to the rest
    stderr = capsys.readouterr().err
    assert stderr.count("optprobe: collector") == 1
    assert ("Raising" if broken == "raises" else "JSONLines") in stderr


def test_jsonl_recovers_whole_lines_after_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "events.jsonl"
    j = JSONLines(path)
    j.handle([hooks.Event("train/loss", 0, 1.0)])
    real = j._file

    class HalfThenFull:  # writes a line and a piece of the next, then the disk is full
        closed = False

        def write(self, data):
            real.write(bytes(data[: bytes(data).index(b"\n") + 6]))
            raise OSError(28, "No space left on device")

    j._file = HalfThenFull()
    with pytest.raises(OSError):
        j.handle([hooks.Event("train/loss", 1, 2.0), hooks.Event("train/loss", 2, 3.0)])
    j._file = real
    j.handle([hooks.Event("train/loss", 3, 4.0)])
    j.close()
    good, bad = read_events(path)
    assert [r["step"] for r in good] == [0, 1, 3]  # step 1 was written whole
    assert len(bad) == 1  # only the torn step-2 line, ended by the next write


_CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    import probe
    from dashboards import JSONLines, TensorBoard
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    opt = torch.optim.AdamW(model.parameters())
    tb = TensorBoard({logdir!r}, flush_secs=1)
    p = probe.attach(opt, model=model, every=1, histograms=False,
                     collectors=[tb, JSONLines({logdir!r} + "/events.jsonl")])
    s = 0
    while True:
        model(torch.randn(4, 16)).square().mean().backward()
        opt.step(); opt.zero_grad()
        p.log("train/loss", float(s))
        s += 1
""")


def test_sigkill_leaves_parseable_jsonl_and_a_loadable_tensorboard_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = str(tmp_path)
    env = {**os.environ, "OPTPROBE_STRICT_TOPICS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=ROOT, logdir=logdir)],
                             env=env, stderr=subprocess.PIPE)
    jsonl = tmp_path / "events.jsonl"
    deadline = time.time() + 60
    try:
        while time.time() < deadline and child.poll() is None:
            time.sleep(0.2)
            tb_files = [f for f in os.listdir(logdir) if f.startswith("events.out")]
            if (jsonl.exists() and jsonl.stat().st_size > 200_000 and tb_files
                    and os.path.getsize(os.path.join(logdir, tb_files[0])) > 10_000):
                break
        assert child.poll() is None, child.stderr.read().decode()
        child.send_signal(signal.SIGKILL)  # mid-run: the loop never ends by itself
    finally:
        child.kill()
        child.wait()
    lines = jsonl.read_bytes().split(b"\n")
    whole = lines[:-1]  # the last piece may be torn (or empty after the final newline)
    assert len(whole) > 1000
    steps = [json.loads(line)["step"] for line in whole]
    assert steps == sorted(steps)
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert len(loss) > 10
    assert [e.value for e in loss] == [float(i) for i in range(len(loss))]


def test_exception_in_the_loop_flushes_removes_hooks_and_propagates_unchanged():
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    rec = Recorder()
    boom = KeyError("from the training loop")
    with pytest.raises(KeyError) as info:
        with probe.attach(opt, model=model, every=1, collectors=[rec], bus=hooks.Bus()) as p:
            _step(model, opt, 0)
            p.log("train/loss", torch.tensor(0.5))  # pending until the next step or a flush
            raise boom
    assert info.value is boom
    assert rec.values("train/loss") == [0.5]
    assert rec.closed
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert not opt._optimizer_state_dict_post_hooks
    assert not opt._optimizer_load_state_dict_pre_hooks
    assert not opt._optimizer_load_state_dict_post_hooks


def test_exception_propagates_even_when_close_fails(capsys):
    class BadClose(Recorder):
        def close(self):
            raise OSError("disk gone")

    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(ZeroDivisionError):
        with probe.attach(opt, collectors=[BadClose()], bus=hooks.Bus()):
            raise ZeroDivisionError("loop")
    assert "disk gone" in capsys.readouterr().err


def _poison(model, where):
    model.zero_grad()
    model(torch.randn(8, 4)).square().mean().backward()
    dict(model.named_parameters())["2.weight"].grad[0, 0] = where


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_gradient_is_named_and_the_step_skipped_bit_identically(value):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    rec = Recorder()
    with probe.attach(opt, model=model, every=5, collectors=[rec], bus=hooks.Bus(),
                      on_nonfinite="skip") as p:
        for s in range(3):
            _step(model, opt, s)
        params = {n: t.detach().clone() for n, t in model.named_parameters()}
        state = {n: {k: v.clone() for k, v in opt.state[t].items()}
                 for n, t in model.named_parameters()}
        _poison(model, value)
        grads = {n: t.grad.clone() for n, t in model.named_parameters()}
        opt.step()  # step 3: not sampled, the alarm still fires
        for n, t in model.named_parameters():
            assert torch.equal(t.detach(), params[n]), n
            assert set(opt.state[t]) == set(state[n])
            for k, v in state[n].items():
                assert torch.equal(opt.state[t][k], v), (n, k)
            assert torch.equal(t.grad, grads[n], ) or value != value  # grads given back
        assert p.skipped_steps == 1
        opt.zero_grad()
        _step(model, opt, 4)  # a healthy step after the skip moves the parameters again
        assert not torch.equal(dict(model.named_parameters())["2.weight"].detach(),
                               params["2.weight"])
    named = [e for e in rec.events if e.topic == "anomaly/nonfinite" and e.param]
    assert [(e.step, e.param, e.value) for e in named] == [(3, "2.weight", 1.0)]
    assert [(e.step, e.value) for e in rec.events
            if e.topic == "anomaly/skipped_step" and e.value] == [(3, 1.0)]


def test_nonfinite_without_skip_updates_as_torch_would():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder()
    with probe.attach(opt, model=model, every=1, collectors=[rec], bus=hooks.Bus()):
        _poison(model, float("nan"))
        opt.step()
    assert torch.isnan(dict(model.named_parameters())["2.weight"]).any()
    assert rec.values("anomaly/nonfinite", "2.weight") == [1.0]


@pytest.mark.parametrize("kwargs, match", [
    ({"on_nonfinite": "drop"}, "on_nonfinite"),
    ({"reduce": "sum"}, "reduce"),
    ({"reduce": "mean"}, "reduce needs torch.distributed"),
    ({"histograms": 1}, "histograms"),
    ({"logdir": 3}, "logdir"),
    ({"bus": object()}, "bus"),
])
def test_new_arguments_are_validated_before_any_work(kwargs, match, tmp_path):
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        probe.attach(opt, **kwargs)
    assert not opt._optimizer_step_pre_hooks
    assert not opt._optimizer_state_dict_post_hooks


@pytest.mark.parametrize("raw", ["../x", "../../etc/passwd", "/abs/path", "a/../../b", "..",
                                 "a\\..\\b", "x\x00y"])
def test_parameter_names_cannot_escape_the_run_folder(raw, tmp_path):
    name = safe_name(raw)
    assert "/" not in name and "\\" not in name and ".." not in name and "\x00" not in name
    run = tmp_path / "run"
    target = os.path.realpath(run / name)
    assert os.path.dirname(target) == os.path.realpath(run)


def test_a_hostile_group_name_is_sanitized_in_every_written_tag(tmp_path):
    w = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([{"params": [w], "param_names": ["../../escape"]}], lr=0.1)
    with probe.attach(opt, logdir=tmp_path / "run", every=1) as p:
        w.grad = torch.ones(3)
        opt.step()
    assert all(".." not in tag for tag in p.summary())
    assert sorted(os.listdir(tmp_path)) == ["run"]
    good, bad = read_events(tmp_path / "run" / "events.jsonl")
    assert not bad and {r["tags"].get("param") for r in good} - {None} == {"____escape"}


class _Stubborn(torch.optim.Optimizer):
    """Moves state and parameters even without gradients: what the restore layer is for."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1, "decay": 0.5})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["lr"] *= group["decay"]  # a schedule kept in the group
            for p in group["params"]:
                st = self.state[p]
                st["count"] = st.get("count", 0) + 1
                st.setdefault("trace", torch.zeros_like(p)).add_(p)
                st.pop("scratch", None)
                p.mul_(0.9)  # decays with or without a gradient


def test_skip_restores_an_optimizer_that_moves_without_gradients():
    w = nn.Parameter(torch.arange(6.0).reshape(2, 3))
    opt = _Stubborn([w])
    with probe.attach(opt, collectors=[Recorder()], bus=hooks.Bus(), on_nonfinite="skip") as p:
        w.grad = torch.ones(2, 3)
        opt.step()
        opt.state[w]["scratch"] = torch.ones(1)
        saved_w, saved_trace = w.detach().clone(), opt.state[w]["trace"]
        trace_copy = saved_trace.clone()
        w.grad = torch.full((2, 3), float("nan"))
        opt.step()
        assert p.skipped_steps == 1
    assert torch.equal(w.detach(), saved_w)
    assert opt.param_groups[0]["lr"] == 0.1 * 0.5
    assert opt.state[w]["count"] == 1
    assert opt.state[w]["trace"] is saved_trace and torch.equal(saved_trace, trace_copy)
    assert torch.equal(opt.state[w]["scratch"], torch.ones(1))
    assert torch.isnan(w.grad).all()  # the user still sees the gradient that was refused


@pytest.mark.cuda
def test_skip_on_cuda_is_bit_identical():
    torch.manual_seed(0)
    model = nn.Linear(64, 32).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    with probe.attach(opt, model=model, every=1, collectors=[Recorder()], bus=hooks.Bus(),
                      on_nonfinite="skip") as p:
        model(torch.randn(8, 64, device="cuda")).square().mean().backward()
        opt.step()
        opt.zero_grad()
        saved = [t.detach().clone() for t in model.parameters()]
        state = [{k: v.clone() for k, v in opt.state[t].items()} for t in model.parameters()]
        model(torch.randn(8, 64, device="cuda")).square().mean().backward()
        model.weight.grad[3, 3] = float("inf")
        opt.step()
        assert p.skipped_steps == 1
    for t, v, st in zip(model.parameters(), saved, state):
        assert torch.equal(t.detach(), v)
        for k, x in st.items():
            assert torch.equal(opt.state[t][k], x)


def test_read_events_never_evaluates_what_it_reads(tmp_path):
    import pickle

    path = tmp_path / "events.jsonl"
    flag = tmp_path / "pwned"
    payload = pickle.dumps(eval)  # bytes a careless reader would unpickle
    path.write_bytes(b'{"topic":"train/loss","step":0,"value":1.0}\n'
                     + payload + b"\n"
                     + f'__import__("os").mknod("{flag}")\n'.encode()
                     + b'{"topic":"train/loss","step":1}\n'
                     + b'[1, 2]\n')
    good, bad = read_events(path)
    assert [r["step"] for r in good] == [0]
    assert [n for n, _ in bad] == [2, 3, 4, 5]  # every refusal is reported with its line
    assert not flag.exists()


def test_tensorboard_recovers_after_a_full_disk(tmp_path, monkeypatch, capfd):
    """Writes fail with ENOSPC (the last record torn) for steps 10-19, then the disk has room
    again: every later step is in TensorBoard's view of the run, the lost batches are counted,
    and no writer thread prints a traceback."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.tensorflow_stub.io import gfile

    real = gfile.LocalFileSystem._write
    full = {"on": False}

    def write(self, filename, content, mode):
        if full["on"]:
            with open(filename, mode) as f:  # half a record reaches the disk
                f.write(bytes(content)[: len(content) // 2])
            raise OSError(28, "No space left on device")
        return real(self, filename, content, mode)

    monkeypatch.setattr(gfile.LocalFileSystem, "_write", write)
    # the folder check before a new file sees the same full disk
    monkeypatch.setattr(event_writer, "_takes_writes", lambda folder: not full["on"])
    tb = TensorBoard(tmp_path, flush_secs=1, retry_secs=0)
    bus = hooks.Bus()
    bus.subscribe(tb, "*")
    for s in range(40):
        full["on"] = 10 <= s < 20
        bus.begin_step(s)
        bus.emit("train/loss", float(s))
        bus.end_step()
        tb.flush()
    bus.close()
    assert tb._out.reopened >= 1 and bus.collector_errors >= 1
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert set(range(10)) <= set(steps) and set(range(21, 40)) <= set(steps), steps
    assert "train/loss" in acc.Tags()["scalars"]
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.count("optprobe: collector TensorBoard") == 1


def test_the_write_check_leaves_nothing_and_fails_where_nothing_can_be_written(tmp_path):
    assert event_writer._takes_writes(str(tmp_path / "made-again"))
    assert os.listdir(tmp_path / "made-again") == []
    (tmp_path / "a-file").write_text("x")
    assert not event_writer._takes_writes(str(tmp_path / "a-file" / "run"))


def test_a_run_folder_deleted_mid_run_is_made_again_and_the_fault_counted(tmp_path, capfd):
    """rm -rf of the run folder during training: the steps after it are in a new events.jsonl
    and TensorBoard file in the folder made again, the fault counted, the run unharmed."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with probe.attach(opt, model=model, every=1, logdir=run) as p:
        for s in range(10):
            if s == 5:
                p.flush()
                shutil.rmtree(run)
            _step(model, opt, s)
            p.log("train/loss", float(s))
            p.flush()
    good, _ = read_events(run / "events.jsonl")
    assert {r["step"] for r in good if r["topic"] == "train/loss"} >= set(range(6, 10))
    assert p.bus.collector_errors >= 1
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert {e.step for e in acc.Scalars("train/loss")} >= set(range(6, 10))
    err = capfd.readouterr().err
    assert "Traceback" not in err and "was removed while the run wrote it" in err


def test_a_logdir_that_is_a_file_is_refused_before_any_work(tmp_path):
    path = tmp_path / "afile"
    path.write_text("x")
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="logdir must be a folder"):
        probe.attach(opt, logdir=path)
    assert not opt._optimizer_step_pre_hooks and path.read_text() == "x"


def test_keyboard_interrupt_inside_the_with_flushes_and_propagates(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(KeyboardInterrupt):
        with probe.attach(opt, model=model, every=1, logdir=tmp_path):
            for s in range(3):
                _step(model, opt, s)
            raise KeyboardInterrupt
    good, bad = read_events(tmp_path / "events.jsonl")
    assert not bad and {r["step"] for r in good if r["topic"] == "step/time_ms"} == {0, 1, 2}
    assert not opt._optimizer_step_pre_hooks
