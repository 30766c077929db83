"""torch.distributed support: rank tags on every event and statistics reduced across ranks.

Reductions run at sampled steps only and always as exactly one collective of a fixed size
(every parameter of the optimizer, whether or not this rank wants any topic), so ranks that
subscribe to different topics still make the same collective calls and never deadlock.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist

from hooks import Event, Vector

REDUCE_OPS = (None, "mean", "max")


def rank_and_world() -> tuple[int, int] | None:
    """``(rank, world_size)`` when torch.distributed is initialized, else None."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


class RankTagged:
    """Wraps a collector so every event it receives carries ``tags["rank"]``."""

    def __init__(self, collector: Any, rank: int) -> None:
        self.collector = collector
        self.rank = str(int(rank))
        self.name = getattr(collector, "name", None) or type(collector).__name__
        self.vectors = getattr(collector, "vectors", False) is True

    def handle(self, events: list[Event | Vector]) -> None:
        r = self.rank
        self.collector.handle([dataclasses.replace(e, tags={**e.tags, "rank": r})
                               for e in events])

    def flush(self) -> None:
        flush = getattr(self.collector, "flush", None)
        if flush is not None:
            flush()

    def close(self) -> None:
        close = getattr(self.collector, "close", None)
        if close is not None:
            close()


def check_same_on_all_ranks(values: dict[str, int]) -> None:
    """Raise ValueError naming the first setting that differs between ranks (one collective):
    a reduction with mismatched ``every`` or parameter counts would hang or mix tensors."""
    v = torch.tensor([float(x) for x in values.values()], dtype=torch.float64)
    both = torch.cat([v, -v])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    hi, lo = both[:len(v)], -both[len(v):]
    for (name, _), a, b in zip(values.items(), lo.tolist(), hi.tolist()):
        if a != b:
            raise ValueError(f"{name} must be the same on every rank when reduce is set, "
                             f"got values from {a:g} to {b:g}")


def reduce_stats(rows: torch.Tensor, present: torch.Tensor, totals: torch.Tensor,
                 op: str, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce per-parameter ``rows`` (K x P; ``present`` marks the columns this rank has) and
    ``totals`` (T) across ranks in one all_reduce; a column no rank has comes back NaN."""
    if op not in ("mean", "max"):
        raise ValueError(f"op must be 'mean' or 'max', got {op!r}")
    k, p = rows.shape
    fill = 0.0 if op == "mean" else -math.inf
    rows = torch.where(present.bool().unsqueeze(0), rows, torch.full_like(rows, fill))
    flat = torch.cat([rows.reshape(-1), present.to(rows.dtype), totals.to(rows.dtype)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM if op == "mean" else dist.ReduceOp.MAX)
    out = flat[:k * p].reshape(k, p)
    count = flat[k * p:k * p + p]
    tot = flat[k * p + p:]
    if op == "mean":
        out = out / count.clamp_min(1).unsqueeze(0)
        tot = tot / world
    out = torch.where(count.unsqueeze(0) > 0, out, torch.full_like(out, math.nan))
    return out, tot
