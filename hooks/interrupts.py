"""Holding back Ctrl-C while a step's telemetry is handed to the collectors.

A KeyboardInterrupt that lands inside delivery (a collector half way through a write) would
lose the step's values, or the last steps' ones, from every file: the run's record would then
disagree with what the loop counted. ``deferred_sigint()`` makes delivery atomic with respect
to SIGINT: a Ctrl-C that arrives inside is raised as soon as the block ends.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class deferred_sigint:  # noqa: N801 - used as a context manager, like contextlib's
    """Context manager: a SIGINT received inside runs the previous handler on exit.

    A no-op off the main thread (only it may set handlers, and only it gets the interrupt)
    and when SIGINT is not handled by Python (ignored, or a handler set from C)."""

    __slots__ = ("_old", "_caught")

    def __enter__(self) -> deferred_sigint:
        self._old: Any = None
        self._caught: tuple[int, FrameType | None] | None = None
        if threading.current_thread() is not threading.main_thread():
            return self
        old = signal.getsignal(signal.SIGINT)
        if callable(old):
            self._old = old
            signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        self._caught = (signum, frame)

    def __exit__(self, *exc: object) -> None:
        old, self._old = self._old, None
        if old is None:
            return
        signal.signal(signal.SIGINT, old)
        if self._caught is not None:
            caught, self._caught = self._caught, None
            old(*caught)  # default_int_handler raises KeyboardInterrupt here
