"""The Event: one resolved telemetry value, as collectors receive it."""

from __future__ import annotations

from dataclasses import dataclass, field

Value = float | list | str


@dataclass(frozen=True, slots=True)
class Event:
    """A telemetry value resolved on the host: a float, a list of floats (histogram) or text."""

    topic: str
    step: int
    value: Value
    tags: dict = field(default_factory=dict)
    wall_time: float = 0.0

    @property
    def param(self) -> str | None:
        """The ``param`` tag (parameter, layer, block or device name), if any."""
        return self.tags.get("param")

    def tag_path(self) -> str:
        """``<topic>/<param>`` for per-parameter topics, else ``<topic>`` (TensorBoard tags)."""
        p = self.tags.get("param")
        return f"{self.topic}/{p}" if p else self.topic

    def to_dict(self) -> dict:
        """A JSON-ready dict of the event."""
        return {"topic": self.topic, "step": self.step, "value": self.value,
                "tags": self.tags, "wall_time": self.wall_time}
