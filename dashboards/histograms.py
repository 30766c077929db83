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
import torch

BUCKETS = 30


def bins(values) -> dict | None:
    """The finite ``values`` as ``{"min", "max", "num", "sum", "sum_squares", "limits",
    "counts"}`` (``limits[i]``: bucket i's upper edge, as TensorBoard keeps them); None when
    none is finite. One bucket when all values are equal, or span too few floats for 30
    distinct edges (where ``np.histogram`` raises)."""
    return bins_many([values])[0]


def bins_many(samples: list) -> list[dict | None]:
    """:func:`bins` of each of ``samples`` (sequences of numbers), computed together."""
    # in runs of whole samples of about 32K values: with a step's 300 x 1,024 values at once,
    # each temporary could be a fresh 2.4 MB mapping that glibc faulted in page by page and
    # gave back when freed (two topics: 13 ms in a fresh process, 4.8 ms in runs)
    out: list[dict | None] = []
    lo, n = 0, 0
    for i, s in enumerate(samples):
        n += s.numel() if type(s) is torch.Tensor else len(s) if isinstance(s, list) \
            else np.size(s)
        if n >= _BLOCK:
            out += _bins_run(samples[lo:i + 1])
            lo, n = i + 1, 0
    if lo < len(samples):
        out += _bins_run(samples[lo:])
    return out


_BLOCK = 1 << 15


def _bins_run(samples: list) -> list[dict | None]:
    out: list[dict | None] = [None] * len(samples)
    flat, sizes = _flatten(samples)
    row = np.repeat(np.arange(len(samples)), sizes)
    keep = np.isfinite(flat)
    if not keep.all():
        flat, row = flat[keep], row[keep]
    num = np.bincount(row, minlength=len(samples))
    present = np.flatnonzero(num)
    if not present.size:
        return out
    counts_p = num[present]
    starts = np.concatenate(([0], np.cumsum(counts_p)[:-1]))
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
    if k.size:
        if k.size == present.size:
            mine = None
        else:  # the values of the rows split into buckets
            split_rows = np.zeros(present.size, dtype=bool)
            split_rows[k] = True
            mine = np.repeat(split_rows, counts_p)
        counts = _bucket(flat if mine is None else flat[mine], counts_p[k], lo[k], hi[k],
                         edges).tolist()
        limits = edges[:, 1:].tolist()
    of = dict(zip(k.tolist(), range(k.size)))
    lo_, hi_, sums_, squares_ = lo.tolist(), hi.tolist(), sums.tolist(), squares.tolist()
    for i, (r, n) in enumerate(zip(present.tolist(), counts_p.tolist())):
        j = of.get(i)
        if j is not None:
            lim, c = limits[j], counts[j]
        else:  # one bucket: numpy widens equal values to (v - 0.5, v + 0.5)
            lim, c = [hi_[i] + 0.5 if lo_[i] == hi_[i] else hi_[i]], [n]
        out[r] = {"min": lo_[i], "max": hi_[i], "num": n, "sum": sums_[i],
                  "sum_squares": squares_[i], "limits": lim, "counts": c}
    return out


def _flatten(samples: list) -> tuple[np.ndarray, list[int]]:
    """Every sample's values in one float64 array, and each sample's count; a batch of real
    CPU tensors (the bus's samples) in one torch call rather than one conversion each."""
    if all(type(s) is torch.Tensor and s.device.type == "cpu" and not s.is_complex()
           for s in samples):
        flat = torch.cat([s.detach().reshape(-1) for s in samples])
        if flat.dtype not in _NUMPY_FLOATS:  # bfloat16 and integers: numpy has no view
            flat = flat.double()
        return flat.numpy().astype(np.float64, copy=False), [s.numel() for s in samples]
    rows = [np.asarray(s, dtype=np.float64).reshape(-1) for s in samples]
    return np.concatenate(rows), [r.size for r in rows]


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)
_EPS = float(np.finfo(np.float64).eps)
_NORMAL = float(np.finfo(np.float64).tiny)


def _bucket(v: np.ndarray, n: np.ndarray, lo: np.ndarray, hi: np.ndarray,
            edges: np.ndarray) -> np.ndarray:
    """Bucket counts of consecutive rows of ``v`` (``n[j]`` values for row j, over
    (lo[j], hi[j]) with ``edges[j]``) as ``np.histogram`` with ``BUCKETS`` bins assigns them."""
    width = hi - lo
    f = v - np.repeat(lo, n)
    f /= np.repeat(width, n)
    f *= BUCKETS
    idx = f.astype(np.intp)
    idx[idx == BUCKETS] -= 1
    # numpy corrects the index against the edges themselves within a few ULPs of an edge.
    # Only values whose f lies that close to an integer can need it: f is off its exact value
    # by < ~120 ULPs of 1, an edge by < ~(90 + 30 M / width) (M = max |lo|, |hi|); the window
    # is four times that. A subnormal step rounds absolutely, not relatively: every value.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        window = _EPS * (1000.0 + 150.0 * np.maximum(np.abs(lo), np.abs(hi)) / width)
    window[~(width / BUCKETS >= _NORMAL) | ~np.isfinite(window)] = np.inf
    near = np.flatnonzero(np.abs(f - np.rint(f)) < np.repeat(window, n))
    if near.size:
        row = np.searchsorted(np.cumsum(n), near, side="right")
        x, i = v[near], idx[near]
        e = edges.ravel()
        base = row * (BUCKETS + 1)
        i[x < e.take(base + i)] -= 1
        i[(x >= e.take(base + i + 1)) & (i != BUCKETS - 1)] += 1
        idx[near] = i
    idx += np.repeat(np.arange(0, n.size * BUCKETS, BUCKETS), n)
    return np.bincount(idx, minlength=n.size * BUCKETS).reshape(n.size, BUCKETS)


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
