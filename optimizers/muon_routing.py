"""Which parameters Muon orthogonalizes and which go to its AdamW fallback, and why."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MUON, FALLBACK = "muon", "adamw"


@dataclass(frozen=True)
class Route:
    """The routing decision for one parameter."""

    name: str
    shape: tuple[int, ...]
    route: str  # MUON or FALLBACK
    reason: str
    numel: int

    @property
    def matrix_shape(self) -> tuple[int, int] | None:
        """The 2-D shape Newton-Schulz sees (conv weights flattened to [out, in*kh*kw])."""
        return matrix_shape(self.shape)


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``[out, in*kh*kw]`` for a 2-D or 4-D shape, None for any other rank."""
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 4:
        return shape[0], shape[1] * shape[2] * shape[3]
    return None


def decide(name: str, p: torch.Tensor, use_muon: bool | None, min_dim: int,
           max_aspect: float) -> Route:
    """Route ``p``: Newton-Schulz for 2-D/4-D matrices whose sides are >= ``min_dim`` and
    whose aspect ratio is <= ``max_aspect``; the fallback for the rest and where the user set
    ``use_muon=False``. ``use_muon=True`` skips the size checks but still needs a matrix;
    a 0-size one goes to the fallback whatever ``use_muon`` says."""
    shape = tuple(p.shape)
    numel = p.numel()
    ms = matrix_shape(shape)
    if use_muon is False:
        return Route(name, shape, FALLBACK, "marked use_muon=False", numel)
    if ms is None:
        if use_muon:
            raise ValueError(f"use_muon=True needs a 2-D or 4-D parameter, but {name} has "
                             f"shape {list(shape)}")
        kind = {0: "scalar", 1: "1-D (bias/norm)"}.get(len(shape), f"{len(shape)}-D")
        return Route(name, shape, FALLBACK, f"{kind}: not 2-D/4-D", numel)
    if p.is_complex():
        raise ValueError(f"params must be real: {name} is {p.dtype}")
    rows, cols = ms
    if numel == 0:  # use_muon=True too: no matrix to orthogonalize (and no rows/cols ratio)
        return Route(name, shape, FALLBACK, f"0-size {rows}x{cols}: nothing to orthogonalize",
                     numel)
    flat = "conv [out, in*kh*kw]" if len(shape) == 4 else "2-D"
    if use_muon:
        return Route(name, shape, MUON, f"{flat}, marked use_muon=True", numel)
    if min(rows, cols) < min_dim:
        return Route(name, shape, FALLBACK,
                     f"side {min(rows, cols)} < min_dim {min_dim}", numel)
    aspect = max(rows, cols) / min(rows, cols)
    if aspect > max_aspect:
        return Route(name, shape, FALLBACK,
                     f"aspect {aspect:.1f} > max_aspect {max_aspect:g}", numel)
    return Route(name, shape, MUON, f"{flat} {rows}x{cols}", numel)


def coverage(routes: list[Route]) -> float:
    """Fraction of parameter elements that go through Newton-Schulz (0 when there are none)."""
    total = sum(r.numel for r in routes)
    return sum(r.numel for r in routes if r.route == MUON) / total if total else 0.0


def table(routes: list[Route]) -> str:
    """A readable text table: name, shape, route, reason, share of elements; coverage last."""
    total = sum(r.numel for r in routes) or 1
    rows = [("name", "shape", "route", "reason", "share %")]
    for r in routes:
        rows.append((r.name, "x".join(map(str, r.shape)) or "scalar", r.route, r.reason,
                     f"{100.0 * r.numel / total:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) if i < 4 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n_muon = sum(r.route == MUON for r in routes)
    lines.append(f"coverage: {100.0 * coverage(routes):.2f}% of {total} elements through "
                 f"Newton-Schulz ({n_muon} of {len(routes)} parameters)")
    return "\n".join(lines)


def check_routing_args(min_dim: int, max_aspect: float) -> None:
    """ValueError naming the argument when a routing threshold is out of range."""
    if isinstance(min_dim, bool) or not isinstance(min_dim, int) or min_dim < 1:
        raise ValueError(f"min_dim must be an int >= 1, got {min_dim!r}")
    if isinstance(max_aspect, bool) or not isinstance(max_aspect, (int, float)) \
            or not 1.0 <= max_aspect <= math.inf:
        raise ValueError(f"max_aspect must be a float >= 1 (inf allowed), got {max_aspect!r}")
