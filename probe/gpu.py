"""GPU sampler: a daemon thread reading NVML (nvidia-ml-py) at a set rate.

Samples are aggregated per step window (mean and max) and emitted as ``gpu/*`` on the
training thread by ``emit(bus)``, so the bus stays single-threaded. Without an NVIDIA driver
or library the sampler starts no thread and emits one ``gpu/status`` text saying why.

NVML calls made from the training thread or at exit (init, shutdown) are time-bounded: a
driver that stops answering costs at most ``NVML_TIMEOUT_S`` once, never a hung run or exit,
and NVML is not shut down under a sampler thread still inside it.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Iterable
from types import ModuleType
from typing import Any

import torch

import hooks

NVML_TIMEOUT_S = 5.0

# topic -> how to read it from a handle, converted to the catalogue's unit
METRICS = ("gpu/utilization", "gpu/memory_used", "gpu/power", "gpu/temperature", "gpu/sm_clock")


def _read(nvml: Any, handle: Any) -> tuple[float, ...]:
    return (
        float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),          # %
        float(nvml.nvmlDeviceGetMemoryInfo(handle).used),               # bytes
        nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,                  # mW -> W
        float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),  # degC
        float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),  # MHz
    )


def _handle_for(nvml: Any, device: torch.device | int) -> Any:
    """The NVML handle of a torch device (through its UUID, so CUDA_VISIBLE_DEVICES is
    respected) or of an NVML index."""
    if isinstance(device, int):
        return nvml.nvmlDeviceGetHandleByIndex(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        try:
            return nvml.nvmlDeviceGetHandleByUUID("GPU-" + str(uuid))
        except Exception:  # older drivers spell UUIDs differently: fall back to the index
            pass
    return nvml.nvmlDeviceGetHandleByIndex(index)


def _bounded(fn: Any, timeout: float) -> tuple[bool, Any]:
    """Run ``fn()`` on a daemon thread: ``(True, result)``, ``(True, exception)`` when it
    raised, or ``(False, None)`` when it did not return within ``timeout`` seconds."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # handed back to the caller, never lost on the thread
            out.append(exc)

    t = threading.Thread(target=run, name="optprobe-nvml-call", daemon=True)
    t.start()
    t.join(timeout)
    return (True, out[0]) if out else (False, None)


class Sampler:
    """Samples ``devices`` (torch CUDA devices or NVML indices; None: every NVML device)
    ``hz`` times a second on a daemon thread; ``emit(bus)`` sends each window's mean/max."""

    def __init__(self, devices: Iterable[torch.device | str | int] | None = None,
                 hz: float = 5.0, *, nvml: ModuleType | Any | None = None,
                 start: bool = True, timeout: float = NVML_TIMEOUT_S) -> None:
        if isinstance(hz, bool) or not isinstance(hz, (int, float)) or not 0 < hz <= 1000:
            raise ValueError(f"hz must be a number in (0, 1000], got {hz!r}")
        if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                or not 0 < timeout < float("inf")):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
        self.timeout = float(timeout)
        devs: list[torch.device | int] | None = None
        if devices is not None:
            devs = []
            for d in devices:
                if isinstance(d, int) and not isinstance(d, bool) and d >= 0:
                    devs.append(d)
                    continue
                dev = torch.device(d) if isinstance(d, str) else d
                if not isinstance(dev, torch.device) or dev.type != "cuda":
                    raise ValueError(f"devices must be CUDA devices or NVML indices >= 0, "
                                     f"got {d!r}")
                devs.append(dev)
        self.hz = float(hz)
        self.status: str | None = None  # why sampling is off, or None when it runs
        self.names: list[str] = []
        self.samples_taken = 0
        self._handles: list[Any] = []
        self._nvml = None
        self._lock = threading.Lock()
        self._window: list[list[tuple[float, ...]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._atexit = None
        self._reported = False
        self._init(nvml, devs)
        if start and self.status is None:
            self.start()

    def _init(self, nvml: Any, devs: list[torch.device | int] | None) -> None:
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError as exc:
                self.status = f"GPU sampling off: nvidia-ml-py is not installed ({exc})"
                return
        done, res = _bounded(nvml.nvmlInit, self.timeout)
        if not done:  # a hung driver: leave NVML alone, never call into it again
            self.status = f"GPU sampling off: NVML did not answer nvmlInit in {self.timeout:g} s"
            return
        if isinstance(res, Exception):  # NVMLError_LibraryNotFound / DriverNotLoaded and kin
            self.status = f"GPU sampling off: NVML could not start ({res})"
            return
        self._nvml = nvml

        def first_read() -> tuple[list, list[str]]:
            found = devs if devs is not None else list(range(nvml.nvmlDeviceGetCount()))
            handles = [_handle_for(nvml, d) for d in found]
            if not handles:
                raise RuntimeError("no NVIDIA device found")
            _read(nvml, handles[0])  # fail here, not on the thread
            return handles, [str(d) if isinstance(d, torch.device) else f"nvml:{d}"
                             for d in found]

        done, res = _bounded(first_read, self.timeout)
        if not done:
            self.status = f"GPU sampling off: NVML did not answer in {self.timeout:g} s"
            self._nvml = None  # a call is still inside NVML: shutting down under it may hang
            return
        if isinstance(res, BaseException):
            self.status = f"GPU sampling off: {res}"
            self._shutdown_nvml()
            return
        self._handles, self.names = res
        self._window = [[] for _ in self._handles]

    # -- the thread ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the sampling thread (no-op when sampling is off or already running)."""
        if self.status is not None or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="optprobe-gpu-sampler",
                                        daemon=True)
        self._thread.start()
        # stop the thread and shut NVML down at interpreter exit too, if close() never ran
        ref = weakref.ref(self)
        self._atexit = lambda: (ref() is not None and ref().close())
        atexit.register(self._atexit)

    def _run(self) -> None:
        period = 1.0 / self.hz
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(period)

    def sample(self) -> None:
        """Take one sample of every device now (the thread calls this ``hz`` times a second)."""
        try:
            rows = [_read(self._nvml, h) for h in self._handles]
        except Exception:  # a transient NVML error loses one sample, not the thread
            return
        with self._lock:
            for win, row in zip(self._window, rows):
                win.append(row)
            self.samples_taken += 1

    @property
    def running(self) -> bool:
        """True while the sampling thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    # -- the training thread -------------------------------------------------------------
    def window(self) -> dict[str, dict[str, tuple[float, float, int]]]:
        """Take the current window: ``{device: {topic: (mean, max, samples)}}``; resets it."""
        with self._lock:
            taken, self._window = self._window, [[] for _ in self._handles]
        out: dict[str, dict[str, tuple[float, float, int]]] = {}
        for name, rows in zip(self.names, taken):
            if not rows:
                continue
            cols = list(zip(*rows))
            out[name] = {t: (sum(c) / len(c), max(c), len(c)) for t, c in zip(METRICS, cols)}
        return out

    def emit(self, bus: hooks.Bus) -> None:
        """Emit the window as ``gpu/<metric>`` with ``param`` ``<device>/mean`` and
        ``<device>/max``; when sampling is off, emit ``gpu/status`` once."""
        if self.status is not None:
            if not self._reported:
                self._reported = True
                bus.emit("gpu/status", self.status)
            return
        if not any(bus.wants(t) for t in METRICS):
            return
        for dev, metrics in self.window().items():
            for topic, (mean, mx, n) in metrics.items():
                bus.emit(topic, mean, param=f"{dev}/mean", device=dev, stat="mean", samples=n)
                bus.emit(topic, mx, param=f"{dev}/max", device=dev, stat="max", samples=n)

    def _shutdown_nvml(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is not None:  # a hung shutdown is abandoned on its daemon thread
            _bounded(nvml.nvmlShutdown, self.timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Stop and join the thread (at most ``timeout`` s), then shut NVML down; a thread
        still inside NVML is left to die with the process and NVML is not shut down under it."""
        self._stop.set()
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None
        if self._thread is not None:
            self._thread.join(timeout)
            stuck = self._thread.is_alive()
            self._thread = None
            if stuck:
                self._nvml = None
                self.status = "GPU sampling off: the sampler thread hung inside NVML"
                return
        self._shutdown_nvml()
