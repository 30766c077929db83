"""Profiler collector: torch.profiler traces of a few steps, with telemetry as counter tracks.

Traces are written as ``<worker>.<ns>.pt.trace.json`` into the run folder (what
``tensorboard_trace_handler`` writes and torch-tb-profiler lists); Perfetto and
chrome://tracing open the same files. Scalars of the traced steps are added to each trace as
``"ph": "C"`` counter events, one track per topic, one series per parameter, placed at a
zero-length ``optprobe/step N`` marker that the probe drops at the start of step N.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable

import torch
from torch.profiler import ProfilerAction, ProfilerActivity

from hooks import Event, Vector
from hooks.topics import is_histogram

MARKER = "optprobe/step "
_COUNTER_CAT = "optprobe"
_ACTIVE = (ProfilerAction.RECORD, ProfilerAction.RECORD_AND_SAVE)


def _rank() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def worker_name() -> str:
    """``<host>_<pid>_rank<r>``: unique per process and rank, as torch-tb-profiler expects."""
    return f"{socket.gethostname()}_{os.getpid()}_rank{_rank()}"


def _check_count(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


class Profiler:
    """Drives ``torch.profiler`` over the probe's steps (``wait``/``warmup``/``active`` steps,
    ``repeat`` cycles) and writes trace files with telemetry counters into ``logdir``."""

    name = "Profiler"
    vectors = True  # per-parameter scalars as one Vector each; samples are skipped unread

    def __init__(self, logdir: str | os.PathLike, wait: int = 1, warmup: int = 1,
                 active: int = 3, repeat: int = 1, *,
                 activities: Iterable[ProfilerActivity] | None = None,
                 record_shapes: bool = False, profile_memory: bool = False,
                 with_stack: bool = False) -> None:
        _check_count("wait", wait, 0)
        _check_count("warmup", warmup, 0)
        _check_count("active", active, 1)
        _check_count("repeat", repeat, 0)
        self.logdir = os.fspath(logdir)
        self.worker = worker_name()
        if activities is None:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
        self._schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active,
                                                 repeat=repeat)
        self._prof = torch.profiler.profile(
            activities=list(activities), schedule=self._schedule,
            on_trace_ready=self._trace_ready, record_shapes=record_shapes,
            profile_memory=profile_memory, with_stack=with_stack)
        self.traces: list[str] = []
        self._bus_step: dict[int, int] = {}  # profiler step -> bus step
        self._traced: set[int] = set()  # bus steps recorded (counters kept for these)
        self._values: dict[int, dict[str, dict[str, float]]] = {}
        self._started = False
        self._stopped = False
        self._dirty = False

    # -- driving the profiler ------------------------------------------------------------
    def start(self, step: int = 0, step_markers: bool = True) -> None:
        """Start profiling; ``step`` is the bus step of the first profiler step.
        ``step_markers`` False leaves out the ``ProfilerStep#`` ranges (when ``step()`` is
        called inside ``Optimizer.step``, where they would not nest)."""
        if self._started:
            return
        os.makedirs(self.logdir, exist_ok=True)
        self._prof.record_steps = step_markers
        self._prof.start()
        self._started = True
        self._note(step)

    def _note(self, step: int) -> None:
        k = self._prof.step_num
        self._bus_step[k] = step
        if self._schedule(k) in _ACTIVE:
            self._traced.add(step)

    def mark(self, step: int) -> None:
        """Drop the zero-length marker the counters of bus step ``step`` are placed at."""
        if self._started and not self._stopped and step in self._traced:
            with torch.profiler.record_function(MARKER + str(step)):
                pass

    def step(self, next_step: int) -> None:
        """Advance the profiler; ``next_step`` is the bus step that comes next."""
        if not self._started or self._stopped:
            return
        self._prof.step()
        self._note(next_step)

    @property
    def recording(self) -> bool:
        """True while the current step is traced."""
        return self._started and not self._stopped and \
            self._schedule(self._prof.step_num) in _ACTIVE

    # -- the collector side --------------------------------------------------------------
    def handle(self, events: list[Event | Vector]) -> None:
        for e in events:
            if e.step not in self._traced:
                continue
            if type(e) is Vector:  # a per-parameter scalar topic; samples are no counters
                if not is_histogram(e.topic):
                    series = self._values.setdefault(e.step, {}).setdefault(e.topic, {})
                    series.update(zip(e.params, e.values))
                    self._dirty = True
                continue
            if type(e.value) is not float:
                continue
            series = self._values.setdefault(e.step, {}).setdefault(e.topic, {})
            series[e.param or "total"] = e.value
            self._dirty = True

    def _trace_ready(self, prof: torch.profiler.profile) -> None:
        path = os.path.join(self.logdir, f"{self.worker}.{time.time_ns()}.pt.trace.json")
        prof.export_chrome_trace(path)
        self.traces.append(path)
        add_counters(path, self._values)

    def close(self) -> None:
        """Stop the profiler (a cycle cut short is still written) and add late counters."""
        if self._started and not self._stopped:
            self._stopped = True
            self._prof.stop()
        if self._dirty:
            for path in self.traces:
                add_counters(path, self._values)
            self._dirty = False


def add_counters(path: str, values: dict[int, dict[str, dict[str, float]]]) -> int:
    """Rewrite the trace at ``path`` with one counter event per (step, topic) whose step has a
    marker in it; earlier optprobe counters are replaced. Returns the number of counters."""
    with open(path) as f:
        trace = json.load(f)
    events = [e for e in trace.get("traceEvents", []) if e.get("cat") != _COUNTER_CAT]
    anchors = {}
    for e in events:
        name = e.get("name", "")
        if name.startswith(MARKER) and e.get("ph") == "X":
            try:
                anchors[int(name[len(MARKER):])] = e
            except ValueError:
                continue
    counters = []
    for step, topics in sorted(values.items()):
        a = anchors.get(step)
        if a is None:
            continue
        for topic, series in sorted(topics.items()):
            counters.append({"ph": "C", "cat": _COUNTER_CAT, "name": topic, "pid": a["pid"],
                             "ts": a["ts"], "args": dict(sorted(series.items()))})
    trace["traceEvents"] = events + counters
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(trace, f)
    os.replace(tmp, path)
    return len(counters)
