"""The hook bus: producers emit telemetry, collectors receive it once per step.

``wants(topic)`` is a dict look-up, so an instrument that nobody listens to costs nearly
nothing. Tensor values stay on their device until ``end_step``, where all of a step's
values are concatenated per device and copied to the host in one transfer (on CUDA a
non-blocking copy into pinned memory, read once its event reports done). A collector that
raises is isolated and counted; the pending buffer is bounded and what overflows is counted.

The bus is driven from one thread (the training loop's): ``begin_step``/``emit``/``end_step``
are not locked.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import time
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from hooks import topics as _topics
from hooks.event import Event, Vector, expand
from hooks.interrupts import deferred_sigint
from hooks.timing import NULL_SPAN, CpuSpan, CudaTimer, Span, _profiler_enabled

_NONE, _SAMPLED, _ALWAYS, _ALARM = 0, 1, 2, 3
_DELIVERY = {"sampled": _SAMPLED, "always": _ALWAYS, "alarm": _ALARM}


class Collector(Protocol):
    """Anything with ``handle(events)``; ``close()`` and ``flush()`` are optional. A collector
    with ``vectors = True`` receives a per-parameter statistic as one ``Vector`` record per
    (topic, step) among its Events; the others receive one Event per parameter."""

    def handle(self, events: list[Event]) -> None: ...


def _collector_name(collector: Any) -> str:
    return getattr(collector, "name", None) or type(collector).__name__


class Subscription:
    """A collector's subscription to topic patterns; ``remove()`` ends it."""

    def __init__(self, bus: Bus, collector: Collector, patterns: tuple[str, ...]) -> None:
        self.bus = bus
        self.collector = collector
        self.patterns = patterns
        self.name = _collector_name(collector)
        self.errors = 0
        self.everything = "*" in patterns  # takes every event: no per-event matching
        self.vectors = getattr(collector, "vectors", False) is True
        self._match: dict[str, bool] = {}

    def matches(self, topic: str) -> bool:
        """True when ``topic`` matches one of the patterns (``*`` spans slashes)."""
        hit = self._match.get(topic)
        if hit is None:
            hit = any(fnmatch.fnmatchcase(topic, p) for p in self.patterns)
            self._match[topic] = hit
        return hit

    def remove(self) -> None:
        """Stop delivering to this collector (it is not closed)."""
        self.bus._unsubscribe(self)

    def close(self) -> None:
        """Stop delivering and close the collector; a failing close is counted, not raised."""
        self.bus._unsubscribe(self)
        self.bus._close_collector(self)


class _Pending:
    __slots__ = ("topic", "step", "value", "tags", "wall", "delivery")

    def __init__(self, topic, step, value, tags, wall, delivery):
        self.topic, self.step, self.value = topic, step, value
        self.tags, self.wall, self.delivery = tags, wall, delivery


class _InFlight:
    """A CUDA batch being copied to pinned host memory; ready when its event is done.
    ``items`` are the scalars' share of ``host`` (its first ``n`` values), ``samples`` the
    histogram samples' (the rest)."""

    __slots__ = ("event", "host", "items", "n", "samples")

    def __init__(self, event, host, items, n, samples):
        self.event, self.host, self.items, self.n, self.samples = event, host, items, n, samples


class _Samples:
    """``emit_samples``' value: one 1-d tensor per tag."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors


def _quiet(p: _Pending, value: Any, sampled: bool) -> bool:
    """A quiet alarm on an unsampled step: not news, not delivered."""
    return p.delivery == _ALARM and not sampled and not value


class Bus:
    """Routes telemetry from producers to collectors, one batch per step.

    ``every``: a step ``n`` is sampled when ``n % every == 0``. ``max_pending``: bound of the
    values buffered between two ``end_step`` calls (alarm topics have max(16, max_pending/16)
    more room, so a flood of ordinary values cannot crowd them out). ``strict``: raise on a
    topic missing from the catalogue (default: the ``OPTPROBE_STRICT_TOPICS=1`` environment
    variable).
    """

    def __init__(self, every: int = 1, max_pending: int = 65536, strict: bool | None = None,
                 device: torch.device | str | None = None) -> None:
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self.every = every
        self.max_pending = max_pending
        # alarms (a NaN gradient, a skipped step) still get in when a flood of ordinary
        # values has filled the buffer: the news that matters is not the one dropped
        self._alarm_room = max(16, max_pending // 16)
        self.strict = (os.environ.get("OPTPROBE_STRICT_TOPICS") == "1") if strict is None \
            else bool(strict)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._subs: list[Subscription] = []
        self._want: dict[str, int] = {}
        self._pending: list[_Pending] = []
        self._timers: list[tuple[str, CudaTimer, dict, int, float]] = []
        self._inflight: list[_InFlight] = []
        self._step = 0
        self._sampled = False
        self.dropped_events = 0
        self.collector_errors = 0
        self.diagnostic_errors = 0
        self.host_transfers = 0
        self._reported_dropped = 0
        self._reported_errors = 0
        self._reported_diag = 0
        self._diag_seen: set[str] = set()
        self._columns: dict[int, tuple[list, int, tuple[list, dict] | None]] = {}
        self._closed = False

    # -- configuration -------------------------------------------------------------------
    @property
    def every(self) -> int:
        """Sampling period: step ``n`` is sampled when ``n % every == 0``."""
        return self._every

    @every.setter
    def every(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"every must be an int >= 1, got {value!r}")
        self._every = value

    @property
    def step(self) -> int:
        """The current step (the last begun one between steps)."""
        return self._step

    @property
    def sampled(self) -> bool:
        """True inside a sampled step."""
        return self._sampled

    def subscribe(self, collector: Collector, topics: str | Iterable[str] = "*") -> Subscription:
        """Deliver events whose topic matches ``topics`` (patterns such as ``"muon/*"``)."""
        if not callable(getattr(collector, "handle", None)):
            raise ValueError(f"collector must have a handle(events) method, got {collector!r}")
        patterns = (topics,) if isinstance(topics, str) else tuple(topics)
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"topics must be a non-empty pattern or list of patterns, "
                             f"got {topics!r}")
        sub = Subscription(self, collector, patterns)
        self._subs.append(sub)
        self._want.clear()
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
            self._want.clear()

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        return tuple(self._subs)

    # -- the hot path --------------------------------------------------------------------
    def _resolve_want(self, topic: str) -> int:
        row = _topics.lookup(topic)
        if row is None and self.strict:
            raise KeyError(f"topic {topic!r} is not declared in hooks/topics.py")
        code = _NONE
        if any(s.matches(topic) for s in self._subs):
            code = _DELIVERY[row.delivery] if row is not None else _SAMPLED
        self._want[topic] = code
        return code

    def wants(self, topic: str) -> bool:
        """True when a collector listens to ``topic`` and it would be delivered this step."""
        code = self._want.get(topic)
        if code is None:
            code = self._resolve_want(topic)
        return code >= _ALWAYS or (code == _SAMPLED and self._sampled)

    def emit(self, topic: str, value: Any, **tags: Any) -> None:
        """Queue a value (float, 0-d or n-d tensor, list of floats, str) for this step."""
        self._queue(topic, value, tags, 1)

    def emit_each(self, topic: str, values: torch.Tensor | list[float],
                  tags: list[dict]) -> None:
        """Queue one scalar per element of the 1-d ``values`` (a tensor or host numbers),
        element i tagged ``tags[i]``; when every ``tags[i]`` has a ``param`` and the same other
        tags, collectors with ``vectors = True`` get them as one Vector. A list is kept, not
        copied (pass the same list each step, unchanged): its columns are worked out once."""
        self._queue(topic, values, tags if type(tags) is list else list(tags), len(tags))

    def emit_samples(self, topic: str, samples: list[torch.Tensor], tags: list[dict]) -> None:
        """Queue one histogram sample per parameter (1-d tensors of values), sample i tagged
        ``tags[i]``. Collectors with ``vectors = True`` get them as one Vector whose values
        are float32 CPU tensors (copies, never views of the producer's tensors), read without
        a Python float per value; the others get one Event per sample, a list of floats."""
        if len(samples) != len(tags):
            raise ValueError(f"samples and tags must have one length, got {len(samples)} "
                             f"samples and {len(tags)} tags")
        self._queue(topic, _Samples(samples), tags if type(tags) is list else list(tags),
                    len(tags))

    def _queue(self, topic: str, value: Any, tags: dict | list, count: int) -> None:
        code = self._want.get(topic)
        if code is None:
            code = self._resolve_want(topic)
        if code == _NONE or (code == _SAMPLED and not self._sampled):
            return
        if len(self._pending) >= self.max_pending and (
                code != _ALARM or len(self._pending) >= self.max_pending + self._alarm_room):
            self.dropped_events += count
            return
        self._pending.append(_Pending(topic, self._step, value, tags, time.time(), code))

    def span(self, name: str, device: torch.device | str | None = None, **tags: Any):
        """Context manager timing a block as ``time/<name>`` and naming it in profiler traces."""
        topic = "time/" + name
        timed = self.wants(topic)
        profiling = _profiler_enabled()
        if not timed and not profiling:
            return NULL_SPAN
        dev = self.device if device is None else torch.device(device)
        if not profiling and dev.type != "cuda":
            return CpuSpan(self, topic, tags)
        return Span(self, topic, tags, timed, dev if dev.type == "cuda" else None, mark=True)

    def timer(self, topic: str, device: torch.device | str | None = None, **tags: Any):
        """Like ``span`` but emits the elapsed ms under ``topic`` itself, with no profiler range."""
        if not self.wants(topic):
            return NULL_SPAN
        dev = self.device if device is None else torch.device(device)
        if dev.type != "cuda":
            return CpuSpan(self, topic, tags)
        return Span(self, topic, tags, True, dev, mark=False)

    def _add_elapsed(self, topic: str, ms: float, tags: dict) -> None:
        # the span was opened because the topic is wanted: skip emit's checks but the bound
        if len(self._pending) >= self.max_pending:
            self.dropped_events += 1
            return
        self._pending.append(_Pending(topic, self._step, ms, tags, time.time(), _SAMPLED))

    def _add_timer(self, topic: str, timer: CudaTimer, tags: dict) -> None:
        if len(self._timers) + len(self._pending) >= self.max_pending:
            self.dropped_events += 1
            return
        self._timers.append((topic, timer, tags, self._step, time.time()))

    # -- step boundaries -----------------------------------------------------------------
    def begin_step(self, step: int, sampled: bool | None = None) -> None:
        """Open step ``step``; it is sampled when ``step % every == 0`` unless ``sampled``
        says otherwise (the probe samples every step the profiler traces)."""
        self._step = int(step)
        self._sampled = self._step % self._every == 0 if sampled is None else bool(sampled)

    def end_step(self) -> None:
        """Resolve the step's values in one batch per device and deliver them."""
        sampled = self._sampled
        self._sampled = False
        if (self._pending or self._inflight or self._timers
                or self.dropped_events != self._reported_dropped
                or self.collector_errors != self._reported_errors
                or self.diagnostic_errors != self._reported_diag):
            with deferred_sigint():  # a Ctrl-C mid-delivery would lose the step's values
                self._deliver(self._resolve(sampled, wait=False))

    def flush(self) -> None:
        """Resolve and deliver everything pending, waiting for in-flight CUDA work."""
        with deferred_sigint():
            self._deliver(self._resolve(True, wait=True))

    def close(self) -> None:
        """Flush, then close and unsubscribe every collector."""
        if self._closed:
            return
        self.flush()
        for sub in list(self._subs):
            sub.close()
        self._closed = True

    def _close_collector(self, sub: Subscription) -> None:
        close = getattr(sub.collector, "close", None)
        if close is None:
            return
        try:
            close()
        except Exception as exc:  # a collector's fault never breaks the run
            self._fault(sub, exc, "close")

    # -- resolution ----------------------------------------------------------------------
    def _resolve(self, sampled: bool, wait: bool) -> list[Event]:
        pending, self._pending = self._pending, []
        events: list[Event] = []
        by_device: dict[torch.device, list[tuple[_Pending, torch.Tensor]]] = {}
        samples: dict[torch.device, list[tuple[_Pending, list[torch.Tensor]]]] = {}
        for p in pending:
            v = p.value
            if isinstance(v, torch.Tensor):
                by_device.setdefault(v.device, []).append((p, _flat32(v)))
            elif type(v) is _Samples:
                if v.tensors:
                    dev = v.tensors[0].device
                    ts = [_flat32(t if t.device == dev else t.to(dev)) for t in v.tensors]
                    samples.setdefault(dev, []).append((p, ts))
            elif isinstance(p.tags, list):  # emit_each of host numbers
                self._split(events, [(p, len(p.tags), sampled)], [float(x) for x in v])
            else:
                self._append(events, p, v, sampled)
        for device in {**by_device, **samples}:
            items = by_device.get(device, [])
            taken = samples.get(device, [])
            # samples go last and are always copied: a sample may be a view of a gradient
            parts = [t for _, t in items] + [t for _, ts in taken for t in ts]
            flat = torch.cat(parts) if len(parts) > 1 or taken else parts[0]
            n = sum(t.numel() for _, t in items)
            scalars = [(p, t.numel(), sampled) for p, t in items]
            shares = [(p, [t.numel() for t in ts]) for p, ts in taken]
            self.host_transfers += 1
            if device.type == "cuda":
                host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
                with torch.cuda.device(device):  # copy and event on the values' own device
                    host.copy_(flat, non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(torch.cuda.current_stream(device))
                self._inflight.append(_InFlight(ev, host, scalars, n, shares))
            else:
                self._split(events, scalars, flat[:n].tolist())
                self._split_samples(events, shares, flat[n:])
        self._drain_inflight(events, wait)
        self._drain_timers(events, sampled, wait)
        self._health(events)
        return events

    def _split_samples(self, events: list[Event], shares, host: torch.Tensor) -> None:
        i = 0
        for p, lengths in shares:
            views = []
            for n in lengths:
                views.append(host[i:i + n])
                i += n
            cols = self._columns_of(p.tags)
            if cols is not None:
                events.append(Vector(p.topic, p.step, views, cols[0], cols[1], p.wall))
            else:
                events.extend(Event(p.topic, p.step, v.tolist(), _str_tags(t), p.wall)
                              for v, t in zip(views, p.tags))

    def _split(self, events: list[Event], items, values: list) -> None:
        i = 0
        add = events.append
        for p, n, sampled in items:
            chunk = values[i:i + n]
            i += n
            if isinstance(p.tags, list):  # emit_each: one Vector (or an event per element)
                quiet_alarm = p.delivery == _ALARM and not sampled
                cols = self._columns_of(p.tags)
                if cols is not None:
                    params, common = cols
                    if quiet_alarm:
                        keep = [i for i, v in enumerate(chunk) if v]
                        if not keep:
                            continue
                        chunk, params = [chunk[i] for i in keep], [params[i] for i in keep]
                    add(Vector(p.topic, p.step, chunk, params, common, p.wall))
                    continue
                topic, step, wall = p.topic, p.step, p.wall
                for v, tags in zip(chunk, p.tags):
                    if quiet_alarm and not v:
                        continue
                    add(Event(topic, step, v, _str_tags(tags), wall))
            else:  # tolist() gave Python floats already: no per-value conversion
                value = chunk[0] if n == 1 and _is_scalar(p.topic) else chunk
                if not _quiet(p, value, sampled):
                    add(Event(p.topic, p.step, value, _str_tags(p.tags), p.wall))

    def _columns_of(self, tags: list[dict]) -> tuple[list, dict] | None:
        """(parameter names, shared tags) when every dict of ``tags`` has a ``param`` and the
        same other tags, else None. Producers pass the same list every step: kept by identity."""
        hit = self._columns.get(id(tags))
        if hit is not None and hit[0] is tags and hit[1] == len(tags):
            return hit[2]
        cols: tuple[list, dict] | None = None
        if tags:
            first = {k: v for k, v in tags[0].items() if k != "param"}
            params = []
            for t in tags:
                name = t.get("param")
                if name is None or len(t) != len(first) + 1 or any(
                        t.get(k) != v for k, v in first.items()):
                    params = None
                    break
                params.append(str(name))
            if params is not None:
                cols = (params, _str_tags(first))
        if len(self._columns) > 64:  # producers with fresh lists each step: do not grow
            self._columns.clear()
        self._columns[id(tags)] = (tags, len(tags), cols)
        return cols

    def _drain_inflight(self, events: list[Event], wait: bool) -> None:
        keep = []
        for f in self._inflight:
            if wait:
                f.event.synchronize()
            if wait or f.event.query():
                self._split(events, f.items, f.host[:f.n].tolist())
                self._split_samples(events, f.samples, f.host[f.n:])
            else:
                keep.append(f)
        self._inflight = keep

    def _drain_timers(self, events: list[Event], sampled: bool, wait: bool) -> None:
        keep = []
        for topic, timer, tags, step, wall in self._timers:
            if wait or timer.done():
                p = _Pending(topic, step, None, tags, wall, _SAMPLED)
                self._append(events, p, timer.elapsed_ms(wait=wait), True)
            else:
                keep.append((topic, timer, tags, step, wall))
        self._timers = keep

    def _append(self, events: list[Event], p: _Pending, value: Any, sampled: bool) -> None:
        if _quiet(p, value, sampled):
            return
        kind = type(value)
        if kind is not float and kind is not str:
            if kind in (int, bool):
                value = float(value)
            elif kind in (list, tuple):
                value = [float(x) for x in value]
            else:
                value = str(value)
        events.append(Event(p.topic, p.step, value, _str_tags(p.tags), p.wall))

    def _health(self, events: list[Event]) -> None:
        now = time.time()
        if self.dropped_events != self._reported_dropped:
            self._reported_dropped = self.dropped_events
            self._append_health(events, "probe/dropped_events", self.dropped_events, now)
        if self.collector_errors != self._reported_errors:
            self._reported_errors = self.collector_errors
            self._append_health(events, "probe/collector_errors", self.collector_errors, now)
        if self.diagnostic_errors != self._reported_diag:
            self._reported_diag = self.diagnostic_errors
            self._append_health(events, "probe/diagnostic_errors", self.diagnostic_errors, now)

    def _append_health(self, events, topic, value, now) -> None:
        if self.wants(topic):
            events.append(Event(topic, self._step, float(value), {}, now))

    def diagnostic_failed(self, name: str, exc: BaseException) -> None:
        """Count a telemetry-only computation that raised inside a step (the step goes on
        without it): ``probe/diagnostic_errors``, one stderr line per ``name``."""
        self.diagnostic_errors += 1
        if name not in self._diag_seen:
            self._diag_seen.add(name)
            print(f"optprobe: diagnostic {name} failed: {exc!r}; the step goes on without it, "
                  f"further failures are counted in probe/diagnostic_errors", file=sys.stderr)

    # -- delivery ------------------------------------------------------------------------
    def _deliver(self, records: list) -> None:
        if not records:
            return
        expanded = None
        for sub in list(self._subs):
            if sub.vectors:
                events = records
            else:
                if expanded is None:
                    expanded = expand(records)
                events = expanded
            mine = list(events) if sub.everything else [e for e in events
                                                        if sub.matches(e.topic)]
            if not mine:
                continue
            try:
                sub.collector.handle(mine)
            except Exception as exc:  # a collector's fault never breaks the run
                self._fault(sub, exc, "handle")

    def _fault(self, sub: Subscription, exc: BaseException, where: str) -> None:
        self.collector_errors += 1
        sub.errors += 1
        if sub.errors == 1:
            print(f"optprobe: collector {sub.name} failed in {where}(): {exc!r}; training "
                  f"goes on, further failures are counted in probe/collector_errors",
                  file=sys.stderr)


def _flat32(v: torch.Tensor) -> torch.Tensor:
    """``v`` detached, 1-d and float32; each call is a dispatch, so only the needed ones."""
    if v.requires_grad:
        v = v.detach()
    if v.dim() != 1:
        v = v.reshape(-1)
    if v.dtype != torch.float32:
        v = v.float()
    return v


def _str_tags(tags: dict | None) -> dict:
    """A copy of ``tags`` (collectors may keep it) with every value a str."""
    if not tags:
        return {}
    out = dict(tags)
    for k, v in out.items():
        if type(v) is not str:
            out[k] = str(v)
    return out


def _is_scalar(topic: str) -> bool:
    row = _topics.lookup(topic)
    return row is None or row.kind == _topics.SCALAR


_default: Bus | None = None


def default_bus() -> Bus:
    """A process-wide bus, for code that wants one shared bus on purpose (pass it as
    ``bus=default_bus()``); ``bus=None`` gives each optimizer a bus of its own."""
    global _default
    if _default is None:
        _default = Bus()
    return _default


def resolve_bus(bus: Bus | None) -> Bus:
    """``bus`` itself, or a new private Bus when it is None: two optimizers (and the probes
    attached to them) never share a bus unless the caller passes the same one."""
    if bus is None:
        return Bus()
    if not isinstance(bus, Bus):
        raise ValueError(f"bus must be a hooks.Bus or None, got {type(bus).__name__}")
    return bus
