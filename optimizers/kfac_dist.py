"""torch.distributed plumbing for K-FAC: sums of factor statistics over ranks, and the rows
of low-rank factors gathered from every rank (so the Gram matrix is global)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Ranks in the default process group (1 when torch.distributed is not in use)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The element-wise sums over ranks of ``tensors``, in one collective per dtype/device."""
    if world_size() == 1 or not tensors:
        return list(tensors)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    for idx in groups.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset:offset + n].view_as(tensors[i])
            offset += n
    return out  # type: ignore[return-value]


def gather_counts(counts: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's ``counts`` (one list per rank, in rank order)."""
    ws = world_size()
    if ws == 1:
        return [list(counts)]
    mine = torch.tensor(counts, dtype=torch.int64, device=device)
    bufs = [torch.empty_like(mine) for _ in range(ws)]
    dist.all_gather(bufs, mine)
    return [b.tolist() for b in bufs]


def gather_rows(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows ``[t_r, d]`` of every rank stacked in rank order (``counts[r]`` = ``t_r``)."""
    ws = world_size()
    if ws == 1:
        return rows
    width = max(counts)
    padded = rows.new_zeros((width, rows.shape[1]))
    padded[:rows.shape[0]] = rows
    bufs = [torch.empty_like(padded) for _ in range(ws)]
    dist.all_gather(bufs, padded)
    return torch.cat([b[:c] for b, c in zip(bufs, counts)])
