"""A collector run on its own thread behind a bounded queue: a slow disk never slows training.

When the queue is full the batch is dropped and counted (``dropped``, and the bus's
``probe/dropped_events`` when a bus is given), never buffered without bound. ``flush()``
waits until the worker has delivered what was queued and flushed the collector. The thread
is a daemon, stops on ``close()`` and is closed at interpreter exit.
"""

from __future__ import annotations

import atexit
import queue
import sys
import threading
import time
import weakref
from typing import Any

from hooks import Bus, Event, Vector

_STOP = object()


class Background:
    """Delivers batches to ``collector`` from a worker thread, at most ``max_batches`` queued."""

    def __init__(self, collector: Any, max_batches: int = 256, bus: Bus | None = None,
                 join_timeout: float = 10.0) -> None:
        if not callable(getattr(collector, "handle", None)):
            raise ValueError(f"collector must have a handle(events) method, got {collector!r}")
        if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
            raise ValueError(f"max_batches must be an int >= 1, got {max_batches!r}")
        if bus is not None and not isinstance(bus, Bus):
            raise ValueError(f"bus must be a hooks.Bus or None, got {type(bus).__name__}")
        if not isinstance(join_timeout, (int, float)) or not join_timeout > 0:
            raise ValueError(f"join_timeout must be a number > 0, got {join_timeout!r}")
        self.collector = collector
        self.vectors = getattr(collector, "vectors", False) is True  # passed through as given
        self.name = "Background(" + (getattr(collector, "name", None)
                                      or type(collector).__name__) + ")"
        self.bus = bus
        self.join_timeout = float(join_timeout)
        self.dropped = 0
        self.errors = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        ref = weakref.ref(self)
        self._atexit = lambda: (ref() is not None and ref().close())
        atexit.register(self._atexit)

    def handle(self, events: list[Event]) -> None:
        if self._closed:
            return
        try:
            self._queue.put_nowait(events)
        except queue.Full:
            n = sum(len(e.values) if type(e) is Vector else 1 for e in events)
            self.dropped += n
            if self.bus is not None:  # called on the training thread, as the bus is
                self.bus.dropped_events += n

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until what was queued before this call is delivered and the collector flushed
        (on the worker, in order); False if that took longer than ``timeout`` (default
        ``join_timeout``) seconds or the worker is gone."""
        if self._closed or not self._thread.is_alive():
            return False
        done = threading.Event()
        wait = self.join_timeout if timeout is None else timeout
        try:
            self._queue.put(done, timeout=wait)
        except queue.Full:
            return False
        return done.wait(wait)

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is _STOP:
                return
            try:
                if isinstance(batch, threading.Event):
                    flush = getattr(self.collector, "flush", None)
                    try:
                        if flush is not None:
                            flush()
                    finally:
                        batch.set()
                    continue
                self.collector.handle(batch)
            except Exception as exc:  # the worker must outlive a failing collector
                self.errors += 1
                if self.bus is not None:  # reported with the bus's next step
                    self.bus.collector_errors += 1
                if self.errors == 1:
                    print(f"optprobe: collector {self.name} failed in handle(): {exc!r}; "
                          f"further failures are counted", file=sys.stderr)

    @property
    def alive(self) -> bool:
        """True while the worker thread runs."""
        return self._thread.is_alive()

    def pending(self) -> int:
        """Batches queued and not yet delivered."""
        return self._queue.qsize()

    def close(self) -> None:
        """Deliver what is queued, stop the thread, close the collector."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        # a hung collector must not hang close(): give up join_timeout after the call, in all
        deadline = time.monotonic() + self.join_timeout
        try:
            self._queue.put(_STOP, timeout=self.join_timeout)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        close = getattr(self.collector, "close", None)
        if close is not None:
            close()
