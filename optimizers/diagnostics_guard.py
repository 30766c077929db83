"""Fault isolation for the diagnostics an optimizer computes inside its step.

A diagnostic (a residual, a singular value band, an energy) is telemetry: when it raises,
the step must still finish exactly as it would without telemetry. ``DiagnosticGuard.run``
calls it; an exception is handed to ``Bus.diagnostic_failed``, which says so once on stderr
and counts it in ``probe/diagnostic_errors`` (an alarm topic, so sampling never hides it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hooks


class DiagnosticGuard:
    """Runs one optimizer's diagnostics so that a failing one is counted, never raised."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.errors = 0

    def run(self, bus: hooks.Bus, name: str, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)``; an Exception from it is counted under ``name`` and swallowed."""
        try:
            fn(*args)
        except Exception as exc:  # telemetry never breaks the step
            self.failed(bus, name, exc)

    def failed(self, bus: hooks.Bus, name: str, exc: BaseException) -> None:
        """Count a failure of diagnostic ``name`` on this optimizer and on its bus."""
        self.errors += 1
        try:
            bus.diagnostic_failed(f"{self.owner} {name}", exc)
        except Exception:  # noqa: S110 - a bus that cannot take the count must not fail the step
            pass
