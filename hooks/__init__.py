"""The hook bus: Event and Vector records, Bus, the telemetry catalogue and span timers.
Imports torch only."""

from hooks import topics
from hooks.bus import Bus, Collector, Subscription, default_bus, resolve_bus
from hooks.event import Event, Vector, expand

__all__ = ["Bus", "Collector", "Event", "Subscription", "Vector", "default_bus", "expand",
           "resolve_bus", "topics"]
