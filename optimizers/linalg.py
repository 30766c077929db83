"""Shared numerics for the optimizers: batched low-rank approximation (truncated SVD and
power iteration). Works on real and complex matrices in the last two dimensions."""

from __future__ import annotations

import torch


def _check_rank(a: torch.Tensor, k: int) -> None:
    if a.ndim < 2:
        raise ValueError(f"a must have at least 2 dimensions (..., m, n), got shape "
                         f"{tuple(a.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")


def lowrank_svd(a: torch.Tensor, k: int) -> torch.Tensor:
    """Best rank-``k`` approximation of every matrix in ``a`` [..., m, n] (truncated SVD)."""
    _check_rank(a, k)
    if k >= min(a.shape[-2:]):
        return a.clone()
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return (u[..., :k] * s[..., None, :k].to(u.dtype)) @ vh[..., :k, :]


def _orthonormalize(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] == 1:  # one column: QR reduces to a normalization, at a fraction of the cost
        norm = torch.linalg.vector_norm(x, dim=-2, keepdim=True)
        return x / norm.clamp_min(torch.finfo(norm.dtype).tiny)
    return torch.linalg.qr(x).Q


_STARTS: dict[tuple, torch.Tensor] = {}


def _start(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fixed pseudo-random orthonormal [n, k] start, made once per shape, dtype and device
    with a private generator so the caller's random stream is left untouched."""
    key = (n, k, dtype, device)
    q = _STARTS.get(key)
    if q is None:
        gen = torch.Generator().manual_seed(0x5EED)
        real = torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32
        x = torch.randn(n, k, generator=gen, dtype=real)
        if dtype.is_complex:
            x = torch.complex(x, torch.randn(n, k, generator=gen, dtype=real))
        q = _STARTS[key] = torch.linalg.qr(x).Q.to(dtype=dtype, device=device)
    return q


def lowrank_poweriter(a: torch.Tensor, k: int, steps: int = 1) -> torch.Tensor:
    """Rank-``k`` approximation ``A Q Q^H`` of every matrix in ``a`` [..., m, n], with ``Q``
    from ``steps`` rounds of subspace iteration (``Q <- orth(A^H orth(A Q))``) from a fixed
    random start; the subspace converges to the top-k right singular vectors at rate
    (s_{k+1}/s_k)^2 per step, so on a well-separated spectrum it matches the truncated SVD."""
    _check_rank(a, k)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if k >= min(a.shape[-2:]):
        return a.clone()
    q = _start(a.shape[-1], k, a.dtype, a.device)
    for _ in range(steps):
        z = _orthonormalize(a @ q)
        # (Z^H A)^H rather than A^H Z: conjugating the k-column Z is cheaper than all of A
        q = _orthonormalize((z.mH @ a).mH)
    return (a @ q) @ q.mH


def rank1_poweriter(a: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """Rank-1 approximations of the matrices ``a[:, :, j]`` of ``a`` [m, n, batch] (batch
    last), by the iteration of ``lowrank_poweriter`` with k = 1 written as broadcast
    products and sums: for many small matrices this beats batched matmuls, and it reads
    the layout a DFT over the last dims produces."""
    if a.ndim != 3:
        raise ValueError(f"a must have shape [m, n, batch], got {tuple(a.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    tiny = torch.finfo(a.real.dtype).tiny

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / torch.linalg.vector_norm(v, dim=0, keepdim=True).clamp_min(tiny)

    q = _start(a.shape[1], 1, a.dtype, a.device)  # [n, 1]: one start for the whole batch
    for _ in range(steps):
        z = unit((a * q).sum(1))  # A q, [m, batch]
        r = unit((a * z.conj()[:, None]).sum(0))  # z^H A = conj(A^H z), [n, batch]
        q = r.conj()
    return (a * q).sum(1)[:, None] * r[None]  # (A q) q^H
