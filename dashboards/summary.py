"""Running aggregates per tag (count, last, min, max, mean): what ``Probe.summary()`` returns."""

from __future__ import annotations

import math

from hooks import Event


class Summary:
    """Keeps, per ``<topic>/<param>`` tag, the count, last, min, max and mean of scalar values;
    text topics keep their last value."""

    name = "Summary"

    def __init__(self) -> None:
        self.stats: dict[str, dict] = {}

    def handle(self, events: list[Event]) -> None:
        stats = self.stats
        for e in events:
            v = e.value
            if isinstance(v, list):
                continue
            tag = e.tag_path()
            s = stats.get(tag)
            if isinstance(v, str):
                stats[tag] = {"topic": e.topic, "count": (s or {}).get("count", 0) + 1,
                              "last": v, "step": e.step}
                continue
            if s is None:
                s = stats[tag] = {"topic": e.topic, "count": 0, "sum": 0.0, "last": v,
                                  "min": math.inf, "max": -math.inf, "step": e.step,
                                  "nonfinite": 0}
            s["count"] += 1
            s["last"] = v
            s["step"] = e.step
            if math.isfinite(v):
                s["sum"] += v
                s["min"] = min(s["min"], v)
                s["max"] = max(s["max"], v)
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
