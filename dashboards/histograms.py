"""Histograms as files store them: 30 equal-width buckets over the finite values, the
summary TensorBoard's HistogramProto holds, made once in numpy."""

from __future__ import annotations

import numpy as np

BUCKETS = 30


def bins(values) -> dict | None:
    """The finite ``values`` as ``{"min", "max", "num", "sum", "sum_squares", "limits",
    "counts"}`` (``limits[i]``: bucket i's upper edge, as TensorBoard keeps them); None when
    none is finite. One bucket when all values are equal."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if not v.size:
        return None
    lo, hi = float(v.min()), float(v.max())
    counts, edges = np.histogram(v, bins=BUCKETS if lo < hi else 1, range=(lo, hi))
    return {"min": lo, "max": hi, "num": int(v.size), "sum": float(v.sum()),
            "sum_squares": float(np.dot(v, v)), "limits": edges[1:].tolist(),
            "counts": counts.tolist()}
