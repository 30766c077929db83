"""Shared numerics for the optimizers: extreme eigenvalues of symmetric matrices (Lanczos),
batched low-rank approximation (truncated SVD, power iteration) on real or complex matrices,
clipped eigendecomposition, a Cholesky inverse that never raises (jitter backoff, then pinv)
and power iteration for the largest eigenvalue."""

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


def finite_eigvalsh(A: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending) of each symmetric matrix in ``A``; NaN for a matrix holding a
    NaN/Inf or one LAPACK fails on, instead of an exception (telemetry must not break a step).

    Non-finite matrices are swapped for zeros before the call, with no host read."""
    bad = ~torch.isfinite(A).all(dim=-1).all(dim=-1)
    safe = torch.where(bad[..., None, None], torch.zeros((), dtype=A.dtype, device=A.device), A)
    try:
        ev = torch.linalg.eigvalsh(safe)
    except RuntimeError:  # _LinAlgError: no convergence on a finite but extreme matrix
        return torch.full(A.shape[:-1], float("nan"), dtype=A.dtype, device=A.device)
    return torch.where(bad[..., None], torch.full((), float("nan"), dtype=ev.dtype,
                                                  device=ev.device), ev)


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
        ev = finite_eigvalsh(A3)
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
    ev = finite_eigvalsh((T + T.mT) * 0.5)
    return ev[:, 0].reshape(batch), ev[:, -1].reshape(batch)


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
