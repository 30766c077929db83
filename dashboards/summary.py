"""Running aggregates per tag (count, last, min, max, mean): what ``Probe.summary()`` returns."""

from __future__ import annotations

import math

from hooks import Event, Vector


class Summary:
    """Keeps, per ``<topic>/<param>`` tag, the count, last, min, max and mean of scalar values;
    text topics keep their last value."""

    name = "Summary"
    vectors = True

    def __init__(self) -> None:
        self.stats: dict[str, dict] = {}

    def handle(self, events: list[Event | Vector]) -> None:
        add = self._add
        for e in events:
            if type(e) is Vector:
                topic, step = e.topic, e.step
                for tag, v in zip(e.tag_paths(), e.values):
                    add(tag, topic, step, v)
                continue
            v = e.value
            if isinstance(v, list):
                continue
            tag = e.tag_path()
            if isinstance(v, str):
                s = self.stats.get(tag)
                self.stats[tag] = {"topic": e.topic, "count": (s or {}).get("count", 0) + 1,
                                   "last": v, "step": e.step}
                continue
            add(tag, e.topic, e.step, v)

    def _add(self, tag: str, topic: str, step: int, v: float) -> None:
        s = self.stats.get(tag)
        if s is None:
            s = self.stats[tag] = {"topic": topic, "count": 0, "sum": 0.0, "last": v,
                                   "min": math.inf, "max": -math.inf, "step": step,
                                   "nonfinite": 0}
        s["count"] += 1
        s["last"] = v
        s["step"] = step
        if math.isfinite(v):
            s["sum"] += v
            if v < s["min"]:
                s["min"] = v
            if v > s["max"]:
                s["max"] = v
        else:
            s["nonfinite"] += 1

    def result(self) -> dict[str, dict]:
        """A copy of the aggregates, with ``mean`` over the finite values."""
        out = {}
        for tag, s in self.stats.items():
            s = dict(s)
            if "sum" in s:
                finite = s["count"] - s["nonfinite"]
                s["mean"] = s.pop("sum") / finite if finite else math.nan
                if not finite:
                    s["min"] = s["max"] = math.nan
            out[tag] = s
        return out

    def state_dict(self) -> dict:
        return {"stats": {k: dict(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {k: dict(v) for k, v in state.get("stats", {}).items()}
