"""The Event: one resolved telemetry value, as collectors receive it."""

from __future__ import annotations

from dataclasses import dataclass, field

from hooks import topics

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


@dataclass(frozen=True, slots=True)
class Vector:
    """One per-parameter statistic for one step, column-wise: ``values[i]`` belongs to the
    parameter ``params[i]``; ``tags`` are the tags all of them share (without ``param``).
    ``values[i]`` is a float, or for a histogram topic a 1-d float32 CPU tensor holding the
    parameter's sample (``Bus.emit_samples``; ``.numpy()`` reads it without a copy).

    The bus hands a Vector to collectors that set ``vectors = True``; the others receive
    ``events()``, one Event per parameter, as before (a sample as a list of floats)."""

    topic: str
    step: int
    values: list
    params: list
    tags: dict = field(default_factory=dict)
    wall_time: float = 0.0

    def events(self) -> list[Event]:
        """The same values as one Event per parameter (``tags`` plus ``param``)."""
        topic, step, wall, tags = self.topic, self.step, self.wall_time, self.tags
        return [Event(topic, step, _host(v), {**tags, "param": p}, wall)
                for v, p in zip(self.values, self.params)]

    def tag_paths(self) -> list[str]:
        """``<topic>/<param>`` of each value (TensorBoard tags)."""
        t = self.topic
        return [f"{t}/{p}" for p in self.params]

    def to_dict(self) -> dict:
        """A JSON-ready dict: one line per topic per step, the names written once."""
        values = self.values
        if topics.is_histogram(self.topic):  # samples as lists of floats
            values = [_host(v) for v in values]
        return {"topic": self.topic, "step": self.step, "values": values,
                "params": self.params, "tags": self.tags, "wall_time": self.wall_time}


def _host(v):
    """A Vector value as an Event holds it: a float stays, a sample becomes a list of floats."""
    tolist = getattr(v, "tolist", None)
    return v if tolist is None else tolist()


def expand(records: list) -> list[Event]:
    """``records`` with every Vector replaced by its Events (order kept)."""
    if not any(type(r) is Vector for r in records):
        return records
    out: list[Event] = []
    for r in records:
        if type(r) is Vector:
            out.extend(r.events())
        else:
            out.append(r)
    return out
