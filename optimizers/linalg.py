"""Shared numerics for the optimizers: extreme eigenvalues of symmetric matrices by Lanczos."""

from __future__ import annotations

import torch

_START: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _start_vector(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fixed pseudo-random unit vector; its own generator leaves the user's RNG untouched."""
    key = (m, dtype, device)
    v = _START.get(key)
    if v is None:
        g = torch.Generator().manual_seed(0x5EED + m)
        v = torch.randn(m, generator=g, dtype=torch.float64)
        v = (v / v.norm()).to(dtype=dtype, device=device)
        _START[key] = v
    return v


def lanczos_extreme_eigvalsh(A: torch.Tensor, steps: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimates of the smallest and largest eigenvalues of symmetric ``A`` (``[..., m, m]``).

    ``steps`` Lanczos steps with full reorthogonalization build a Krylov basis; it is
    re-orthonormalized by QR before the Rayleigh-Ritz projection, so the estimates always lie
    inside ``[lambda_min, lambda_max]`` (Cauchy interlacing), even after a breakdown.
    Costs ``steps`` matrix-vector products per matrix instead of a full eigendecomposition.
    """
    if not isinstance(A, torch.Tensor) or A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be a tensor of square matrices [..., m, m], got shape "
                         f"{tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    m = A.shape[-1]
    batch = A.shape[:-2]
    if m == 0:
        raise ValueError("A must have m >= 1 rows, got an empty matrix")
    A3 = A.reshape(-1, m, m)
    k = min(steps, m)
    if k == m:  # the Krylov space is the whole space: the exact answer is as cheap
        ev = torch.linalg.eigvalsh(A3)
        return ev[:, 0].reshape(batch), ev[:, -1].reshape(batch)
    b = A3.shape[0]
    Q = A3.new_zeros(b, m, k)
    Q[:, :, 0] = _start_vector(m, A.dtype, A.device)
    tiny = torch.finfo(A.dtype).tiny
    for j in range(k - 1):
        w = A3 @ Q[:, :, j:j + 1]
        basis = Q[:, :, :j + 1]
        # twice is enough: one Gram-Schmidt pass leaves O(eps * cond) components behind
        w = w - basis @ (basis.mT @ w)
        w = w - basis @ (basis.mT @ w)
        Q[:, :, j + 1:j + 2] = w / w.norm(dim=1, keepdim=True).clamp_min(tiny)
    # after a breakdown (an invariant subspace found) a column is noise; QR makes it harmless
    Q, _ = torch.linalg.qr(Q)
    T = Q.mT @ (A3 @ Q)
    ev = torch.linalg.eigvalsh((T + T.mT) * 0.5)
    return ev[:, 0].reshape(batch), ev[:, -1].reshape(batch)
