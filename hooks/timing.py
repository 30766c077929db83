"""Span timers: a named block timed on the host or with CUDA events, and a profiler range.

A span on CPU reads ``time.perf_counter``; on CUDA it records a pair of events whose
elapsed time the bus reads only once the end event reports done, so timing never stalls
the device. While ``torch.profiler`` runs, the block also opens a ``record_function``
range of the same name so traces show it inside ``Optimizer.step``.
"""

from __future__ import annotations

import time

import torch

_profiler_enabled = torch.autograd._profiler_enabled
_perf_counter = time.perf_counter


class NullSpan:
    """The span used when nobody wants the time and no profiler runs: does nothing."""

    __slots__ = ()

    def __enter__(self) -> NullSpan:
        return self

    def __exit__(self, *exc) -> None:
        return None


NULL_SPAN = NullSpan()


class CudaTimer:
    """A pair of CUDA events around a block; ``done()`` polls without synchronizing.

    Both events go on the current stream of ``device`` (not of the current device), so a
    span on a bus whose device is not the current one times the right work."""

    __slots__ = ("start", "end", "device")

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def record_start(self) -> None:
        self.start.record(torch.cuda.current_stream(self.device))

    def record_end(self) -> None:
        self.end.record(torch.cuda.current_stream(self.device))

    def done(self) -> bool:
        return self.end.query()

    def elapsed_ms(self, wait: bool = False) -> float:
        if wait:
            self.end.synchronize()
        return self.start.elapsed_time(self.end)


class CpuSpan:
    """The common case made lean: a timed host block with no profiler range."""

    __slots__ = ("bus", "topic", "tags", "_t0")

    def __init__(self, bus, topic: str, tags: dict) -> None:
        self.bus = bus
        self.topic = topic
        self.tags = tags

    def __enter__(self) -> CpuSpan:
        self._t0 = _perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.bus._add_elapsed(self.topic, (_perf_counter() - self._t0) * 1e3, self.tags)
        return None


class Span:
    """Times a block for the bus (``time/<name>``) and marks it for the profiler."""

    __slots__ = ("bus", "topic", "tags", "timed", "cuda", "mark", "_t0", "_timer", "_range")

    def __init__(self, bus, topic: str, tags: dict, timed: bool,
                 cuda: torch.device | None, mark: bool = True) -> None:
        self.bus = bus
        self.topic = topic  # "time/<name>"; the profiler range is named <name>
        self.tags = tags
        self.timed = timed
        self.cuda = cuda
        self.mark = mark
        self._range = None
        self._timer = None

    def __enter__(self) -> Span:
        if self.mark and _profiler_enabled():
            self._range = torch.profiler.record_function(self.topic[5:])
            self._range.__enter__()
        if self.timed:
            if self.cuda:
                self._timer = CudaTimer(self.cuda)
                self._timer.record_start()
            else:
                self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.timed:
            if self.cuda:
                self._timer.record_end()
                self.bus._add_timer(self.topic, self._timer, self.tags)
            else:
                self.bus._add_elapsed(self.topic, (time.perf_counter() - self._t0) * 1e3,
                                      self.tags)
        if self._range is not None:
            self._range.__exit__(*exc)
            self._range = None
        return None
