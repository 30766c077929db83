"""GPU sampler against a fake NVML module (values, units, rate, shutdown, driver missing)
and, on a CUDA machine, against the real one."""

import threading
import time

import pytest
import torch

import hooks
import probe
from probe.gpu import METRICS, Sampler
from tests.helpers import Recorder


class _Util:
    def __init__(self, gpu):
        self.gpu = gpu


class _Mem:
    def __init__(self, used):
        self.used = used


class FakeNVML:
    """The slice of pynvml the sampler uses; readings follow a per-device script."""

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def __init__(self, count=2, fail_init=None):
        self.count = count
        self.fail_init = fail_init
        self.reads = [0] * count
        self.inits = self.shutdowns = 0
        self.threads = []

    def nvmlInit(self):
        if self.fail_init:
            raise self.fail_init
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        if not 0 <= i < self.count:
            raise RuntimeError(f"invalid index {i}")
        return i

    def nvmlDeviceGetUtilizationRates(self, h):
        self.threads.append(threading.get_ident())
        self.reads[h] += 1
        return _Util(10 * (h + 1) + self.reads[h] % 3)  # %, cycles d+0, d+1, d+2

    def nvmlDeviceGetMemoryInfo(self, h):
        return _Mem((h + 1) * 2**30)

    def nvmlDeviceGetPowerUsage(self, h):
        return 150_500 + 1000 * h  # milliwatts

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 60 + h

    def nvmlDeviceGetClockInfo(self, h, clock):
        assert clock == self.NVML_CLOCK_SM
        return 1980


def test_window_values_and_units():
    nvml = FakeNVML()
    s = Sampler([0, 1], nvml=nvml, start=False)
    for _ in range(6):
        s.sample()
    w = s.window()
    assert set(w) == {"nvml:0", "nvml:1"}
    for d in (0, 1):
        m = w[f"nvml:{d}"]
        assert set(m) == set(METRICS)
        base = 10 * (d + 1)
        # utilization read 1..6 -> base + (1, 2, 0, 1, 2, 0)
        assert m["gpu/utilization"] == (pytest.approx(base + 1.0), base + 2.0, 6)
        assert m["gpu/memory_used"][:2] == ((d + 1) * 2**30, (d + 1) * 2**30)
        assert m["gpu/power"][:2] == (pytest.approx(150.5 + d), pytest.approx(150.5 + d))
        assert m["gpu/temperature"][1] == 60 + d and m["gpu/sm_clock"][1] == 1980
    assert s.window() == {}  # the window resets


def test_emit_on_bus_mean_and_max():
    bus, rec = hooks.Bus(), Recorder()
    bus.subscribe(rec, "gpu/*")
    s = Sampler([1], nvml=FakeNVML(), start=False)
    for _ in range(3):
        s.sample()
    bus.begin_step(0)
    s.emit(bus)
    bus.end_step()
    assert rec.values("gpu/utilization", "nvml:1/mean") == [pytest.approx(21.0)]
    assert rec.values("gpu/utilization", "nvml:1/max") == [22.0]
    assert rec.values("gpu/power", "nvml:1/max") == [pytest.approx(151.5)]
    tags = next(e.tags for e in rec.events if e.param == "nvml:1/max")
    assert tags["stat"] == "max" and tags["device"] == "nvml:1" and tags["samples"] == "3"


def test_thread_rate_and_shutdown():
    nvml = FakeNVML(count=1)
    s = Sampler(hz=50, nvml=nvml)
    assert s.running
    time.sleep(0.5)
    s.close()
    assert not s.running and nvml.shutdowns == 1
    # 50 Hz over 0.5 s is 25 samples; a loaded 2-core machine may run late, never early
    assert 5 <= s.samples_taken <= 27
    # one read checks the device at start (a bounded call); the samples come from one thread
    assert len(nvml.threads) == s.samples_taken + 1
    assert len(set(nvml.threads[1:])) == 1 and threading.get_ident() not in nvml.threads
    n = s.samples_taken
    time.sleep(0.1)
    assert s.samples_taken == n  # nothing samples after close


def test_driver_missing_starts_no_thread_and_says_why():
    class NVMLError(Exception):
        pass

    nvml = FakeNVML(fail_init=NVMLError("Driver Not Loaded"))
    before = threading.active_count()
    s = Sampler(nvml=nvml)
    assert s.status is not None and "Driver Not Loaded" in s.status
    assert not s.running and threading.active_count() == before
    bus, rec = hooks.Bus(), Recorder()
    bus.subscribe(rec, "*")
    for step in range(3):
        bus.begin_step(step)
        s.emit(bus)
        bus.end_step()
    assert rec.values("gpu/status") == [s.status]  # once, whatever the sampling
    s.close()


def test_probe_with_gpu_true_keeps_working_without_a_driver(monkeypatch):
    import probe.gpu as gpu

    fake = FakeNVML(fail_init=RuntimeError("NVML Shared Library Not Found"))
    monkeypatch.setattr(gpu.Sampler, "_init",
                        lambda self, nvml, devs, _orig=gpu.Sampler._init: _orig(self, fake, devs))
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    rec = Recorder()
    with probe.attach(opt, every=1, collectors=[rec], gpu=True) as p:
        for _ in range(3):
            w.grad = torch.ones(3)
            opt.step()
    assert p.sampler is not None and not p.sampler.running
    assert rec.values("gpu/status") == ["GPU sampling off: NVML could not start "
                                        "(NVML Shared Library Not Found)"]
    assert len(rec.values("step/time_ms")) == 3
    assert torch.allclose(w.detach(), torch.full((3,), 0.7))


def test_bad_arguments():
    with pytest.raises(ValueError, match="hz"):
        Sampler(hz=0, nvml=FakeNVML())
    with pytest.raises(ValueError, match="devices"):
        Sampler(["cpu"], nvml=FakeNVML())


def test_unknown_device_reports_instead_of_raising():
    nvml = FakeNVML(count=1)
    s = Sampler([3], nvml=nvml)
    assert "invalid index 3" in s.status and not s.running and nvml.shutdowns == 1


@pytest.mark.cuda
def test_real_nvml_on_the_device_in_use():
    dev = torch.device("cuda", torch.cuda.current_device())
    x = torch.randn(4096, 4096, device=dev)
    s = Sampler([dev], hz=20)
    assert s.status is None, s.status
    for _ in range(20):
        x = x @ x.T / 4096
    torch.cuda.synchronize()
    time.sleep(0.3)
    s.close()
    w = s.window()[str(dev)]
    mean, mx, n = w["gpu/memory_used"]
    assert n >= 2 and mx >= torch.cuda.memory_allocated(dev)
    assert 0 <= w["gpu/utilization"][1] <= 100
    assert 1 < w["gpu/power"][1] < 2000 and 0 < w["gpu/temperature"][1] < 120
    assert w["gpu/sm_clock"][1] > 0


@pytest.mark.cuda
def test_probe_auto_samples_the_device_in_use():
    dev = torch.device("cuda", torch.cuda.current_device())
    model = torch.nn.Linear(512, 512).to(dev)
    opt = torch.optim.AdamW(model.parameters())
    rec = Recorder()
    with probe.attach(opt, model=model, every=5, collectors=[rec]) as p:
        assert p.sampler is not None and p.sampler.status is None and p.sampler.running
        for _ in range(10):
            model(torch.randn(64, 512, device=dev)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            time.sleep(0.05)
    assert not p.sampler.running
    util = [e for e in rec.events if e.topic == "gpu/utilization"]
    assert {e.param for e in util} == {f"{dev}/mean", f"{dev}/max"}
    assert {e.step for e in util} <= {0, 5}
    assert rec.values("cuda/memory_allocated", str(dev))[-1] > 512 * 512 * 4


def test_sampler_thread_stops_and_nvml_shuts_down_at_interpreter_exit(tmp_path):
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    marker = tmp_path / "shutdown"
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {root!r})
        from probe.gpu import Sampler
        from tests.test_gpu import FakeNVML
        class Marked(FakeNVML):
            def nvmlShutdown(self):
                open({str(marker)!r}, "w").write("shutdown")
        s = Sampler(hz=50, nvml=Marked(count=1))
        assert s.running
        # no close(): the interpreter exits with the thread running
    """)
    res = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True)
    assert res.returncode == 0, res.stderr.decode()
    assert marker.read_text() == "shutdown"


class HangingNVML(FakeNVML):
    """An NVML whose calls stop returning once ``hang`` is set (a wedged driver)."""

    def __init__(self, hang_on=(), **kw):
        super().__init__(**kw)
        self.hang_on = set(hang_on)
        self.hang = threading.Event()
        self.never = threading.Event()

    def _maybe_hang(self, name):
        if name in self.hang_on or self.hang.is_set():
            self.never.wait()

    def nvmlInit(self):
        self._maybe_hang("init")
        super().nvmlInit()

    def nvmlShutdown(self):
        self._maybe_hang("shutdown")
        super().nvmlShutdown()

    def nvmlDeviceGetUtilizationRates(self, h):
        self._maybe_hang("read")
        return super().nvmlDeviceGetUtilizationRates(h)


def test_a_hung_nvml_init_costs_its_timeout_once_and_turns_sampling_off():
    t0 = time.perf_counter()
    s = Sampler(nvml=HangingNVML(hang_on={"init"}, count=1), timeout=0.3)
    assert time.perf_counter() - t0 < 5
    assert "did not answer nvmlInit" in s.status and not s.running
    s.close()  # nothing to shut down: NVML never started


def test_close_does_not_shut_nvml_down_under_a_sampler_thread_stuck_inside_it():
    nvml = HangingNVML(count=1)
    s = Sampler(hz=50, nvml=nvml, timeout=0.3)
    assert s.running
    nvml.hang.set()  # the next read blocks the sampler thread forever
    time.sleep(0.1)
    t0 = time.perf_counter()
    s.close(timeout=0.2)
    assert time.perf_counter() - t0 < 3
    assert nvml.shutdowns == 0 and "hung inside NVML" in s.status


def test_interpreter_exit_does_not_hang_on_a_hung_nvml(tmp_path):
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {root!r})
        from probe.gpu import Sampler
        from tests.test_gpu import HangingNVML
        nvml = HangingNVML(count=1, hang_on={{"shutdown"}})
        s = Sampler(hz=50, nvml=nvml, timeout=0.5)
        assert s.running
        time.sleep(0.1)
        nvml.hang.set()  # reads and shutdown both hang from now on
        # no close(): the atexit handler must give up on NVML within its bounds
    """)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True)
    assert res.returncode == 0, res.stderr.decode()
    assert time.perf_counter() - t0 < 20
