"""Parameters sharded as DTensors (FSDP2's ``fully_shard``): the probe reads each rank's local
shard and sums squares and dot products over the mesh dimensions the parameter is sharded on,
so every rank reports the norms of the whole parameter, as a single process would."""

from __future__ import annotations

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch without DTensor: nothing is ever sharded
    DTensor = None


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` (``t`` itself when it is no DTensor)."""
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


def shard_groups(params: list[torch.Tensor]) -> list[tuple[list[int], list]] | None:
    """For the DTensor parameters sharded on some mesh dimension: [(their positions, the
    process groups of the dimensions they are sharded on)], one entry per kind of sharding;
    None when no parameter is sharded."""
    if DTensor is None:
        return None
    kinds: dict[tuple, tuple[list[int], list]] = {}
    for i, p in enumerate(params):
        if not isinstance(p, DTensor):
            continue
        dims = tuple(d for d, pl in enumerate(p.placements) if pl.is_shard())
        if not dims:
            continue
        key = (id(p.device_mesh), dims)
        if key not in kinds:
            kinds[key] = ([], [p.device_mesh.get_group(d) for d in dims])
        kinds[key][0].append(i)
    return list(kinds.values()) or None


def global_norms(norms: torch.Tensor, groups: list[tuple[list[int], list]]) -> torch.Tensor:
    """``norms`` (rows of norms, and a last row of dot products when there are four, from
    the local shards) made global for the sharded columns: squares and dots summed over
    their groups (one all_reduce per group and kind of sharding), square roots again."""
    out = norms.clone()
    n = 3 if norms.shape[0] == 4 else norms.shape[0]
    for cols, pgs in groups:
        idx = torch.tensor(cols, device=norms.device)
        part = norms[:, idx].double()
        part[:n] = part[:n].square()
        for pg in pgs:
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=pg)
        part[:n] = part[:n].sqrt()
        out[:, idx] = part.to(out.dtype)
    return out
