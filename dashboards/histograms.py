"""Histograms as files store them: 30 equal-width buckets over the finite values, the
summary TensorBoard's HistogramProto holds, made in numpy for a whole batch at once.

A sampled step of a 150-tensor model brings 300 histograms; ``np.histogram`` called on each
cost each writer thread 25 ms per such step, holding the GIL the training thread needs. The
bucketing below is numpy's own for equal-width bins (its index formula and its one-ULP
corrections against ``np.linspace`` edges), done for every sample of a batch in one pass.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

BUCKETS = 30


def bins(values) -> dict | None:
    """The finite ``values`` as ``{"min", "max", "num", "sum", "sum_squares", "limits",
    "counts"}`` (``limits[i]``: bucket i's upper edge, as TensorBoard keeps them); None when
    none is finite. One bucket when all values are equal, or span too few floats for 30
    distinct edges (where ``np.histogram`` raises)."""
    return bins_many([values])[0]


def bins_many(samples: list) -> list[dict | None]:
    """:func:`bins` of each of ``samples`` (sequences of numbers), computed together."""
    rows = [np.asarray(s, dtype=np.float64).reshape(-1) for s in samples]
    out: list[dict | None] = [None] * len(rows)
    if not rows:
        return out
    flat = np.concatenate(rows)
    row = np.repeat(np.arange(len(rows)), [r.size for r in rows])
    keep = np.isfinite(flat)
    if not keep.all():
        flat, row = flat[keep], row[keep]
    num = np.bincount(row, minlength=len(rows))
    present = np.flatnonzero(num)
    if not present.size:
        return out
    starts = np.concatenate(([0], np.cumsum(num[present])[:-1]))
    lo = np.minimum.reduceat(flat, starts)
    hi = np.maximum.reduceat(flat, starts)
    sums = np.add.reduceat(flat, starts)
    with np.errstate(over="ignore"):  # a sum of squares may overflow to inf, as np.dot's
        squares = np.add.reduceat(flat * flat, starts)
    # numpy's linspace takes another formula for all rows once one row's step is 0, so those
    # rows (a span too small to split) are left out of it
    k = np.flatnonzero((lo < hi) & ((hi - lo) / BUCKETS != 0))
    edges = np.linspace(lo[k], hi[k], BUCKETS + 1, axis=1)
    split = (edges[:, 1:] > edges[:, :-1]).all(axis=1)
    k, edges = k[split], edges[split]
    counts = _bucket(flat, row, present, k, lo, hi, edges) if k.size else None
    of = dict(zip(k.tolist(), range(k.size)))
    for i, r in enumerate(present.tolist()):
        j = of.get(i)
        if j is not None:
            limits, c = edges[j, 1:].tolist(), counts[j].tolist()
        else:  # one bucket: numpy widens equal values to (v - 0.5, v + 0.5)
            limits = [float(hi[i] + 0.5) if lo[i] == hi[i] else float(hi[i])]
            c = [int(num[r])]
        out[r] = {"min": float(lo[i]), "max": float(hi[i]), "num": int(num[r]),
                  "sum": float(sums[i]), "sum_squares": float(squares[i]),
                  "limits": limits, "counts": c}
    return out


def _bucket(flat: np.ndarray, row: np.ndarray, present: np.ndarray, k: np.ndarray,
            lo: np.ndarray, hi: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket counts of rows ``k`` (positions in ``present``, with these ``edges``), as
    ``np.histogram`` over (lo, hi) with ``BUCKETS`` bins assigns their values."""
    if k.size == present.size:  # every row is split: no selection
        v, j = flat, np.searchsorted(present, row)
    else:
        where = np.full(row.max() + 1, -1)
        where[present[k]] = np.arange(k.size)
        j = where[row]
        mine = j >= 0
        v, j = flat[mine], j[mine]
    first = lo[k].take(j)
    idx = ((v - first) / (hi[k] - lo[k]).take(j) * BUCKETS).astype(np.intp)
    idx[idx == BUCKETS] -= 1
    # numpy's corrections within an ULP of an edge, against the edges themselves
    at = j * (BUCKETS + 1) + idx
    e = edges.ravel()
    idx[v < e.take(at)] -= 1
    at = j * (BUCKETS + 1) + idx
    idx[(v >= e.take(at + 1)) & (idx != BUCKETS - 1)] += 1
    return np.bincount(j * BUCKETS + idx, minlength=k.size * BUCKETS).reshape(k.size, BUCKETS)


_SHARED: OrderedDict[int, tuple[list, list]] = OrderedDict()
_SHARED_LOCK = threading.Lock()
_SHARED_KEEP = 4  # the last few steps' topics: every writer of a step asks within that


def bins_of(samples: list) -> list[dict | None]:
    """:func:`bins_many` of a Vector's ``values``, computed once for all the collectors that
    receive the same list (TensorBoard and JSON lines on their own threads each ask)."""
    with _SHARED_LOCK:  # held while computing: a second writer waits, then reuses
        hit = _SHARED.get(id(samples))
        if hit is not None and hit[0] is samples:
            return hit[1]
        out = bins_many(samples)
        _SHARED[id(samples)] = (samples, out)
        while len(_SHARED) > _SHARED_KEEP:
            _SHARED.popitem(last=False)
        return out
