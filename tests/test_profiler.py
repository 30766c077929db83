"""Profiler traces: files that parse, span ranges inside Optimizer.step, counter tracks, and
the run listed by TensorBoard's torch-tb-profiler plugin."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from torch import nn

import hooks
import probe
from dashboards import Console, Profiler
from tests.helpers import Recorder


class StagedSGD(torch.optim.SGD):
    """SGD whose step times two named stages on the bus, one per parameter."""

    def __init__(self, named, bus, lr=0.1):
        named = list(named)
        super().__init__([p for _, p in named], lr=lr)
        self.names = [n for n, _ in named]
        self.bus = bus

    @torch.no_grad()
    def step(self, closure=None):
        for name, p in zip(self.names, self.param_groups[0]["params"]):
            with self.bus.span("test/precondition", param=name):
                g = p.grad @ p.grad.T @ p.grad if p.grad.dim() == 2 else p.grad
            with self.bus.span("test/apply", param=name):
                p.add_(g, alpha=-1e-3)
        return None


def _train(logdir, steps=7, model_hooks=True, every=10):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    bus = hooks.Bus()
    opt = StagedSGD(model.named_parameters(), bus)
    rec = Recorder()
    with probe.attach(opt, model=model if model_hooks else None, logdir=logdir, every=every,
                      bus=bus, profile=True, collectors=[rec], gpu=False) as p:
        for _ in range(steps):
            loss = model(torch.randn(5, 6)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    return p, rec


def _load(path):
    with open(path) as f:
        return json.load(f)["traceEvents"]


@pytest.mark.parametrize("model_hooks", [True, False])
def test_trace_has_spans_inside_step_and_counters(tmp_path, model_hooks):
    p, rec = _train(tmp_path, model_hooks=model_hooks)
    files = glob.glob(str(tmp_path / "*.pt.trace.json"))
    assert len(files) == 1 and files == p.profiler.traces
    assert os.path.basename(files[0]).startswith(p.profiler.worker + ".")
    events = _load(files[0])
    ranges = [e for e in events if e.get("ph") == "X"]
    steps = [e for e in ranges if e["name"].startswith("Optimizer.step#StagedSGD")]
    assert len(steps) == 3  # wait=1, warmup=1, active=3: steps 2, 3, 4
    for name in ("test/precondition", "test/apply"):
        spans = [e for e in ranges if e["name"] == name]
        assert len(spans) == 3 * 4  # 4 parameters per step
        for s in spans:  # each span lies inside one Optimizer.step range
            assert any(o["ts"] <= s["ts"] and s["ts"] + s["dur"] <= o["ts"] + o["dur"]
                       for o in steps)
    step_marks = [e for e in ranges if e["name"].startswith("ProfilerStep#")]
    assert bool(step_marks) == model_hooks
    counters = [e for e in events if e.get("ph") == "C"]
    names = {c["name"] for c in counters}
    assert {"time/test/precondition", "time/test/apply", "grad/norm", "step/time_ms"} <= names
    # traced steps 2..4 are sampled although every=10: the counters are the delivered values
    by_step = {}
    for e in rec.events:
        if type(e.value) is float and e.step in (2, 3, 4):
            by_step.setdefault((e.step, e.topic), {})[e.param or "total"] = e.value
    markers = {e["ts"]: int(e["name"].split()[-1]) for e in ranges
               if e["name"].startswith("optprobe/step ")}
    assert sorted(markers.values()) == [2, 3, 4]
    for c in counters:
        step = markers[c["ts"]]
        assert c["args"] == pytest.approx(by_step[(step, c["name"])])
    assert len(counters) == len(by_step)


def test_profile_needs_logdir_and_validates_schedule(tmp_path):
    opt = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match="logdir"):
        probe.attach(opt, profile=True)
    for kw, bad in (("wait", -1), ("warmup", 1.5), ("active", 0), ("repeat", -2)):
        with pytest.raises(ValueError, match=kw):
            Profiler(tmp_path, **{kw: bad})


def test_short_run_still_writes_a_trace_on_close(tmp_path):
    p, _ = _train(tmp_path, steps=3)  # closed in the middle of the active phase
    files = glob.glob(str(tmp_path / "*.pt.trace.json"))
    assert len(files) == 1
    assert any(e.get("ph") == "C" for e in _load(files[0]))
    assert p.profiler.traces == files


def test_console_breakdown(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    bus = hooks.Bus()
    opt = StagedSGD(model.named_parameters(), bus)
    rec, out = Recorder(), __import__("io").StringIO()
    with probe.attach(opt, every=1, bus=bus, collectors=[rec, Console(out, top=1)], gpu=False):
        for _ in range(4):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
    text = out.getvalue()
    stage = sum(e.value for e in rec.events if e.topic == "time/test/precondition")
    whole = sum(e.value for e in rec.events if e.topic == "step/time_ms" and not e.tags)
    row = next(line for line in text.splitlines() if line.startswith("test/precondition"))
    total, per_step, calls, share = row.split()[1:]
    assert float(total) == pytest.approx(stage, abs=1e-3)
    assert int(calls) == 8 and float(per_step) == pytest.approx(stage / 4, abs=1e-3)
    assert float(share.rstrip("%")) == pytest.approx(100 * stage / whole, abs=0.06)
    slow = text.split("slowest parameters")[1].splitlines()[1].split()[0]
    per_param = {}
    for e in rec.events:
        if e.topic.startswith("time/") and e.param:
            per_param[e.param] = per_param.get(e.param, 0.0) + e.value
    assert slow == max(per_param, key=per_param.get)
    with pytest.raises(ValueError, match="top"):
        Console(top=-1)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_profiler_plugin_lists_the_run(tmp_path):
    run = tmp_path / "exp1"
    _train(run, steps=6)
    port = _free_port()
    tb = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    cmd = [tb] if os.path.exists(tb) else [sys.executable, "-m", "tensorboard.main"]
    proc = subprocess.Popen(cmd + ["--logdir", str(tmp_path), "--host", "127.0.0.1",
                                   "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # the plugin spawns a loader process
    url = f"http://127.0.0.1:{port}/data/plugin/pytorch_profiler/runs"
    runs, deadline = None, time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    data = json.load(r)
                runs = data["runs"]
                if "exp1" in runs:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        assert runs is not None and "exp1" in runs, f"plugin runs: {runs!r}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/pytorch_profiler/"
                                    f"workers?run=exp1&view=Trace", timeout=5) as r:
            workers = json.load(r)
        assert any(w.endswith("_rank0") for w in workers)
    finally:  # the whole group, or the plugin's loader outlives the test
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_demo_profile_writes_a_trace(tmp_path, capsys):
    from probe.cli import main

    rc = main(["demo", "--optimizer", "adamw", "--steps", "8", "--every", "5", "--profile",
               "--runs", str(tmp_path), "--name", "p", "--no-progress"])
    assert rc == 0
    files = glob.glob(str(tmp_path / "p-adamw" / "*.pt.trace.json"))
    assert len(files) == 1 and "profiler trace:" in capsys.readouterr().out
    events = _load(files[0])
    assert len([e for e in events if e.get("name", "").startswith("ProfilerStep#")]) == 3
    counters = {e["name"] for e in events if e.get("ph") == "C"}
    assert {"grad/norm", "update/ratio", "step/time_ms", "train/loss"} <= counters
