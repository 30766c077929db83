"""Shared numerics for the optimizers: clipped eigendecomposition, a Cholesky inverse that
never raises (jitter backoff, then pinv) and power iteration for the largest eigenvalue."""

from __future__ import annotations

import torch


def clipped_eigh(matrix: torch.Tensor, max_condition: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigen-decompose symmetric ``matrix`` and floor its eigenvalues so that
    ``max / min <= max_condition``; returns ``(eigenvalues, eigenvectors, clipped_count)``.

    Without ``max_condition`` only negative eigenvalues (rounding noise of a PSD factor) are
    raised, to 0. ``clipped_count`` (a 0-d int64 tensor, no host sync) counts the eigenvalues
    that were raised.
    """
    if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2 \
            or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"matrix must be a non-empty square 2-D tensor, got "
                         f"{_shape(matrix)}")
    if max_condition is not None and not (_is_number(max_condition) and max_condition >= 1):
        raise ValueError(f"max_condition must be a number >= 1 or None, got {max_condition!r}")
    sym = (matrix + matrix.mT) * 0.5
    try:
        evals, evecs = torch.linalg.eigh(sym)
    except RuntimeError:
        # eigh can fail to converge on badly scaled input; float64 with a tiny shift does not
        scale = sym.diagonal().abs().mean().clamp_min(torch.finfo(torch.float64).tiny)
        sym64 = sym.double() + torch.eye(sym.shape[0], dtype=torch.float64, device=sym.device) \
            * (scale * torch.finfo(sym.dtype).eps)
        evals, evecs = torch.linalg.eigh(sym64)
        evals, evecs = evals.to(sym.dtype), evecs.to(sym.dtype)
    if max_condition is None:
        floor = evals.new_zeros(())
    else:
        floor = evals[-1].clamp_min(0) / max_condition
    clipped = (evals < floor).sum()
    return torch.maximum(evals, floor), evecs, clipped


def robust_cholesky_inverse(matrix: torch.Tensor, max_tries: int = 6
                            ) -> tuple[torch.Tensor, float]:
    """Inverse of symmetric positive (semi)definite ``matrix`` by Cholesky, adding jitter
    ``0, eps, 10 eps, 100 eps, ...`` (``max_tries`` values, times the mean diagonal) until it
    factors, else the pseudo-inverse; returns ``(inverse, jitter)`` with jitter -1 for pinv.

    It never raises: a singular, indefinite or non-finite matrix still gives a finite result.
    The success check reads one flag from the device per try (this runs when inverses are
    refreshed, not every step).
    """
    if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2 \
            or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"matrix must be a non-empty square 2-D tensor, got "
                         f"{_shape(matrix)}")
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise ValueError(f"max_tries must be an int >= 1, got {max_tries!r}")
    sym = torch.nan_to_num((matrix + matrix.mT) * 0.5, nan=0.0, posinf=0.0, neginf=0.0)
    n = sym.shape[0]
    eye = torch.eye(n, dtype=sym.dtype, device=sym.device)
    scale = float(sym.diagonal().abs().mean())
    scale = scale if scale > 0 else 1.0
    eps = torch.finfo(sym.dtype).eps
    for k in range(max_tries):
        jitter = 0.0 if k == 0 else eps * 10.0 ** (k - 1) * scale
        chol, info = torch.linalg.cholesky_ex(sym + jitter * eye if jitter else sym)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            if bool(torch.isfinite(inv).all()):
                return inv, jitter
    try:
        return torch.linalg.pinv(sym, hermitian=True), -1.0
    except RuntimeError:  # the eigensolver did not converge: plain SVD-based pinv, in float64
        return torch.linalg.pinv(sym.double()).to(sym.dtype), -1.0


def power_iteration(matrix: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Largest eigenvalue of symmetric PSD ``matrix`` by ``iters`` power steps from a fixed
    start; a 0-d tensor (a Rayleigh quotient, so never above the true value)."""
    if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2 \
            or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"matrix must be a non-empty square 2-D tensor, got "
                         f"{_shape(matrix)}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    n = matrix.shape[0]
    # a fixed, dense start (private generator: the user's RNG stream is untouched)
    gen = torch.Generator().manual_seed(0x5EED + n)
    v = torch.rand(n, generator=gen, dtype=torch.float64).add_(0.5)
    v = (v / v.norm()).to(dtype=matrix.dtype, device=matrix.device)
    tiny = torch.finfo(matrix.dtype).tiny
    for _ in range(iters):
        w = matrix @ v
        v = w / w.norm().clamp_min(tiny)
    return v @ (matrix @ v)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _shape(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
