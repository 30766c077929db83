"""GPU sampler: a daemon thread reading NVML (nvidia-ml-py) at a set rate.

Samples are aggregated per step window (mean and max) and emitted as ``gpu/*`` on the
training thread by ``emit(bus)``, so the bus stays single-threaded. Without an NVIDIA driver
or library the sampler starts no thread and emits one ``gpu/status`` text saying why.
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


class Sampler:
    """Samples ``devices`` (torch CUDA devices or NVML indices; None: every NVML device)
    ``hz`` times a second on a daemon thread; ``emit(bus)`` sends each window's mean/max."""

    def __init__(self, devices: Iterable[torch.device | str | int] | None = None,
                 hz: float = 5.0, *, nvml: ModuleType | Any | None = None,
                 start: bool = True) -> None:
        if isinstance(hz, bool) or not isinstance(hz, (int, float)) or not 0 < hz <= 1000:
            raise ValueError(f"hz must be a number in (0, 1000], got {hz!r}")
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
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded and kin
            self.status = f"GPU sampling off: NVML could not start ({exc})"
            return
        self._nvml = nvml
        try:
            if devs is None:
                devs = list(range(nvml.nvmlDeviceGetCount()))
            self._handles = [_handle_for(nvml, d) for d in devs]
            self.names = [str(d) if isinstance(d, torch.device) else f"nvml:{d}" for d in devs]
            if not self._handles:
                raise RuntimeError("no NVIDIA device found")
            _read(nvml, self._handles[0])  # fail here, not on the thread
        except Exception as exc:
            self.status = f"GPU sampling off: {exc}"
            self._shutdown_nvml()
            return
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
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None

    def close(self, timeout: float = 2.0) -> None:
        """Stop and join the thread, then shut NVML down."""
        self._stop.set()
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._shutdown_nvml()
