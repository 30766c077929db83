"""Fault isolation for the diagnostics an optimizer computes inside its step.

A diagnostic (a residual, a singular value band, an energy) is telemetry: when it raises,
the step must still finish exactly as it would without telemetry. ``DiagnosticGuard.run``
calls it, and on an exception counts it, says so once on stderr and emits the running count
as ``anomaly/diagnostic_errors`` (an alarm topic, so sampling never hides it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import hooks

TOPIC = "anomaly/diagnostic_errors"


class DiagnosticGuard:
    """Runs one optimizer's diagnostics so that a failing one is counted, never raised."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.errors = 0
        self._reported: set[str] = set()

    def run(self, bus: hooks.Bus, name: str, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)``; an Exception from it is counted under ``name`` and swallowed."""
        try:
            fn(*args)
        except Exception as exc:  # telemetry never breaks the step
            self.failed(bus, name, exc)

    def failed(self, bus: hooks.Bus, name: str, exc: BaseException) -> None:
        """Count a failure of diagnostic ``name``, report it once, emit the count."""
        self.errors += 1
        if name not in self._reported:
            self._reported.add(name)
            print(f"optprobe: {self.owner} diagnostic {name} failed: {exc!r}; the step went "
                  f"on unchanged, further failures are counted in {TOPIC}", file=sys.stderr)
        try:
            if bus.wants(TOPIC):
                bus.emit(TOPIC, float(self.errors), param=name)
        except Exception:  # noqa: S110 - a bus that cannot take the count must not fail the step
            pass
