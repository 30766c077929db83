"""Running aggregates per tag (count, last, min, max, mean): what ``Probe.summary()`` returns."""

from __future__ import annotations

import math

import numpy as np

from hooks import Event, Vector, topics


class Summary:
    """Keeps, per ``<topic>/<param>`` tag, the count, last, min, max and mean of scalar values;
    text topics keep their last value."""

    name = "Summary"
    vectors = True

    def __init__(self) -> None:
        self.stats: dict[str, dict] = {}
        # a per-parameter topic is aggregated column-wise (numpy) and folded into ``stats``
        # when read: per value it cost a dict update, 750 of them a step on a transformer
        self._columns: dict[tuple[str, int], _Column] = {}

    def handle(self, events: list[Event | Vector]) -> None:
        add = self._add
        for e in events:
            if type(e) is Vector:
                if topics.is_histogram(e.topic):
                    continue  # samples, as a histogram Event's list: no running aggregate
                key = (e.topic, id(e.params))
                col = self._columns.get(key)
                if col is None or col.params is not e.params:
                    if col is not None:
                        self._fold()
                    col = self._columns[key] = _Column(e.topic, e.params)
                col.add(e.step, e.values)
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

    def _fold(self) -> None:
        columns, self._columns = self._columns, {}
        for col in columns.values():
            col.fold_into(self.stats)

    def result(self) -> dict[str, dict]:
        """A copy of the aggregates, with ``mean`` over the finite values."""
        self._fold()
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
        self._fold()
        return {"stats": {k: dict(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._columns = {}
        self.stats = {k: dict(v) for k, v in state.get("stats", {}).items()}


class _Column:
    """Count, sum, min, max and last of one per-parameter topic, one entry per parameter."""

    def __init__(self, topic: str, params: list) -> None:
        self.topic, self.params, self.step = topic, params, 0
        n = len(params)
        self.count = 0
        self.nonfinite = np.zeros(n, dtype=np.int64)
        self.sum = np.zeros(n)
        self.min = np.full(n, np.inf)
        self.max = np.full(n, -np.inf)
        self.last = np.zeros(n)

    def add(self, step: int, values: list) -> None:
        v = np.asarray(values, dtype=np.float64)
        bad = ~np.isfinite(v)
        self.count += 1
        self.step = step
        self.last = v
        lo = hi = v
        if bad.any():  # NaN/Inf count apart and stay out of sum, min and max
            self.nonfinite += bad
            lo, hi, v = np.where(bad, np.inf, v), np.where(bad, -np.inf, v), np.where(bad, 0.0, v)
        self.sum += v
        np.fmin(self.min, lo, out=self.min)
        np.fmax(self.max, hi, out=self.max)

    def fold_into(self, stats: dict[str, dict]) -> None:
        if not self.count:
            return
        topic = self.topic
        for i, p in enumerate(self.params):
            tag = f"{topic}/{p}"
            s = stats.get(tag)
            mine = {"topic": topic, "count": self.count, "sum": float(self.sum[i]),
                    "last": float(self.last[i]), "min": float(self.min[i]),
                    "max": float(self.max[i]), "step": self.step,
                    "nonfinite": int(self.nonfinite[i])}
            if s is None or "sum" not in s:
                stats[tag] = mine
                continue
            s["count"] += mine["count"]
            s["sum"] += mine["sum"]
            s["nonfinite"] += mine["nonfinite"]
            s["min"] = min(s["min"], mine["min"])
            s["max"] = max(s["max"], mine["max"])
            if mine["step"] >= s["step"]:
                s["last"], s["step"] = mine["last"], mine["step"]
