"""The hook bus: Event, Bus, the telemetry catalogue and span timers. Imports torch only."""

from hooks import topics
from hooks.bus import Bus, Collector, Subscription, default_bus, resolve_bus
from hooks.event import Event

__all__ = ["Bus", "Collector", "Event", "Subscription", "default_bus", "resolve_bus", "topics"]
