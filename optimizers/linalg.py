"""Shared numerics for the optimizers: extreme eigenvalues of symmetric matrices by Lanczos."""

from __future__ import annotations

import torch

_START: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}


def _fixed_rows(k: int, m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``k`` fixed pseudo-random unit rows ``[k, m]``; a private generator leaves the user's
    RNG stream untouched and makes the estimates deterministic."""
    key = (k, m, dtype, device)
    v = _START.get(key)
    if v is None:
        g = torch.Generator().manual_seed(0x5EED + m)
        v = torch.randn(k, m, generator=g, dtype=torch.float64)
        v = (v / v.norm(dim=1, keepdim=True)).to(dtype=dtype, device=device)
        _START[key] = v
    return v


def lanczos_extreme_eigvalsh(A: torch.Tensor, steps: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimates of the smallest and largest eigenvalues of symmetric ``A`` (``[..., m, m]``).

    ``steps`` Lanczos steps with full reorthogonalization build an orthonormal basis Q; the
    estimates are the extreme eigenvalues of Q A Q^T, so they always lie inside
    ``[lambda_min, lambda_max]`` (Cauchy interlacing). Each new direction gets a tiny fixed
    nudge (1e-3 of the RMS eigenvalue), so a breakdown (an invariant subspace found) yields a fresh
    orthonormal direction instead of noise. ``steps`` row-vector products per matrix
    replace a full eigendecomposition; no host synchronization.
    """
    if not isinstance(A, torch.Tensor) or A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be a tensor of square matrices [..., m, m], got shape "
                         f"{tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    m = A.shape[-1]
    if m == 0:
        raise ValueError("A must have m >= 1 rows, got an empty matrix")
    batch = A.shape[:-2]
    A3 = A.reshape(-1, m, m)
    k = min(steps, m)
    if k == m:  # the Krylov space is the whole space: the exact answer is as cheap
        ev = torch.linalg.eigvalsh(A3)
        return ev[:, 0].reshape(batch), ev[:, -1].reshape(batch)
    b = A3.shape[0]
    fixed = _fixed_rows(k, m, A.dtype, A.device)
    # the nudge is 1e-3 of the RMS eigenvalue; the floor keeps A = 0 finite
    scale = torch.linalg.vector_norm(A3, dim=(-2, -1), keepdim=True) / m ** 0.5
    nudges = (1e-3 * scale + 1e-20) * fixed[1:]
    Q = A3.new_zeros(b, k, m)
    Q[:, 0] = fixed[0]
    # rows: q^T A == (A q)^T for symmetric A, and a row times a matrix is a fast batched gemm;
    # rows not yet filled are zero, so projecting on all of Q projects on the basis so far
    for j in range(k - 1):
        w = torch.baddbmm(nudges[:, j:j + 1], Q[:, j:j + 1], A3)  # [b, 1, m]
        w = torch.baddbmm(w, w @ Q.mT, Q, alpha=-1.0)
        w = torch.baddbmm(w, w @ Q.mT, Q, alpha=-1.0)  # twice is enough (Kahan-Parlett)
        Q[:, j + 1:j + 2] = w / torch.linalg.vector_norm(w, dim=-1, keepdim=True)
    T = Q @ A3 @ Q.mT
    ev = torch.linalg.eigvalsh((T + T.mT) * 0.5)
    return ev[:, 0].reshape(batch), ev[:, -1].reshape(batch)
