"""Newton-Schulz orthogonalization (Muon's core) and what it achieved: residual, singular values.

``orthogonalize`` runs the quintic iteration X <- aX + b(XX^T)X + c(XX^T)^2 X on the shorter
side of G normalized by its Frobenius norm. With Keller Jordan's coefficients it does not
converge to the polar factor UV^T: it pushes every singular value into a band around 1 in
few steps (measured for 5 steps on Gaussian matrices: about 0.68 to 1.13), which is what
Muon needs. ``ns_diagnostics`` measures how far an output is from orthogonal.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from optimizers.linalg import finite_eigvalsh, lanczos_extreme_eigvalsh

DEFAULT_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
EPS = 1e-7  # the Frobenius norm is clamped to this: a zero gradient gives a zero update

NS_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16,
    "float16": torch.float16, "float64": torch.float64,
}


class NSResult(NamedTuple):
    """The orthogonalized matrices (G's shape and dtype) and the iterations each one ran."""

    X: torch.Tensor
    iters: torch.Tensor  # int64 on the CPU, shape G.shape[:-2]


class NSDiagnostics(NamedTuple):
    """Per-matrix float32 figures of an NS output; None where they were not asked for."""

    residual: torch.Tensor | None
    sv_min: torch.Tensor | None
    sv_max: torch.Tensor | None
    frobenius: torch.Tensor | None


def ns_dtype_name(dtype: str | torch.dtype) -> str:
    """The canonical name of an NS working dtype: ``"auto"`` or a key of ``NS_DTYPES``."""
    if isinstance(dtype, torch.dtype):
        for name, dt in NS_DTYPES.items():
            if dt == dtype:
                return name
    elif isinstance(dtype, str) and (dtype == "auto" or dtype in NS_DTYPES):
        return dtype
    raise ValueError(f"dtype must be 'auto' or one of {', '.join(NS_DTYPES)} (a name or a "
                     f"torch.dtype), got {dtype!r}")


def resolve_ns_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The working dtype: ``"auto"`` is bfloat16 on CUDA and float32 elsewhere."""
    name = ns_dtype_name(dtype)
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return NS_DTYPES[name]


def check_ns_args(steps: int, coefficients: tuple[float, float, float],
                  tol: float | None) -> tuple[float, float, float]:
    """Validate the iteration's settings; return the coefficients as a float triple."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 100:
        raise ValueError(f"steps must be an int in [1, 100], got {steps!r}")
    try:
        # a string iterates to characters: "123" must not read as (1, 2, 3)
        if isinstance(coefficients, (str, bytes)) or any(
                isinstance(x, (bool, str, bytes)) for x in coefficients):
            raise TypeError
        a, b, c = (float(x) for x in coefficients)
    except (TypeError, ValueError):
        raise ValueError(f"coefficients must be three finite floats (a, b, c), "
                         f"got {coefficients!r}") from None
    if not all(math.isfinite(x) for x in (a, b, c)):
        raise ValueError(f"coefficients must be three finite floats (a, b, c), "
                         f"got {coefficients!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float))
                            or not 0.0 < tol < math.inf):
        raise ValueError(f"tol must be None or a float in (0, inf), got {tol!r}")
    return a, b, c


def _residual_of_gram(A: torch.Tensor) -> torch.Tensor:
    """||I - A||_F / sqrt(m) per matrix of a batch of m x m Gram matrices, in float32."""
    D = A.float()
    D = D - torch.eye(D.shape[-1], dtype=D.dtype, device=D.device)
    return torch.linalg.vector_norm(D, dim=(-2, -1)) / math.sqrt(D.shape[-1])


def orthogonalize(G: torch.Tensor, steps: int = 5,
                  coefficients: tuple[float, float, float] = DEFAULT_COEFFICIENTS,
                  dtype: str | torch.dtype = "auto", tol: float | None = None) -> NSResult:
    """Approximately orthogonalize ``G`` (``[..., m, n]``) by ``steps`` quintic NS iterations.

    ``tol``: stop a matrix once ||I - XX^T||_F/sqrt(m) < tol, checked after every second
    iteration on the Gram matrix the next iteration needs anyway (each check reads one value
    per batch on the host). ``dtype``: working precision, ``"auto"`` = bf16 on CUDA, fp32 else.
    """
    if not isinstance(G, torch.Tensor) or G.ndim < 2 or not G.is_floating_point():
        raise ValueError(f"G must be a floating tensor with at least 2 dims [..., m, n], got "
                         f"{tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__}")
    a, b, c = check_ns_args(steps, coefficients, tol)
    X, iters, _ = newton_schulz(G.to(resolve_ns_dtype(dtype, G.device)), steps, a, b, c, tol)
    if isinstance(iters, int):
        iters = torch.full(G.shape[:-2], iters, dtype=torch.int64)
    return NSResult(X.to(G.dtype), iters)


def newton_schulz(X: torch.Tensor, steps: int, a: float, b: float, c: float,
                  tol: float | None = None, output_gram: bool = False
                  ) -> tuple[torch.Tensor, int | torch.Tensor, torch.Tensor | None]:
    """The unchecked core of ``orthogonalize``: ``X`` already in the working dtype, the
    result left in it; iterations as an int when every matrix ran the same number, else an
    int64 CPU tensor of shape ``X.shape[:-2]``.

    ``output_gram``: also return the Gram matrix X X^T of the output on its shorter side
    (``[..., m, m]``, working dtype), for diagnostics. When n >= 2m it is formed from the
    last iteration's m x m matrices as P A P with P = aI + bA + cA^2, which equals X X^T of
    the output (P and A commute) and costs 4m^3 instead of 2m^2 n.
    """
    if X.ndim == 2:
        out, iters, gram = _ns_matrix(X, steps, a, b, c, tol, output_gram)
        return out, iters, gram
    m, n = X.shape[-2:]
    out, iters, gram = _ns_batched(X.reshape(-1, m, n), steps, a, b, c, tol, output_gram)
    if tol is not None:
        iters = iters.reshape(X.shape[:-2])
        if bool((iters == steps).all()):
            iters = steps
    else:
        iters = steps
    if gram is not None:
        gram = gram.reshape(*X.shape[:-2], *gram.shape[-2:])
    return out.reshape(X.shape), iters, gram


def _output_gram(X: torch.Tensor, A: torch.Tensor | None, B: torch.Tensor | None,
                 a: float) -> torch.Tensor:
    """X X^T of the output X = (aI + B) X_prev, given A = X_prev X_prev^T and B = bA + cA^2."""
    m, n = X.shape[-2:]
    if A is None or B is None or n < 2 * m:
        return X @ X.mT
    P = B.clone()
    P.diagonal(dim1=-2, dim2=-1).add_(a)
    return P @ A @ P


def _ns_matrix(X: torch.Tensor, steps: int, a: float, b: float, c: float,
               tol: float | None, output_gram: bool = False
               ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """One matrix, with the same operations in the same order as torch.optim.Muon."""
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T
    X = X / X.norm().clamp(min=EPS)
    done, B = steps, None
    for k in range(steps):
        A = X @ X.T
        if tol is not None and k and k % 2 == 0 and _residual_of_gram(A).item() < tol:
            done = k  # stopped here: A is the output's own Gram matrix
            break
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a)
    gram = None
    if output_gram:
        gram = A if done < steps else _output_gram(X, A, B, a)
    return (X.T if tall else X), done, gram


def _ns_batched(X: torch.Tensor, steps: int, a: float, b: float, c: float,
                tol: float | None, output_gram: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A batch ``[B, m, n]``; with ``tol`` a converged matrix is frozen while the rest go on,
    so each one ends exactly where it would have alone."""
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp(min=EPS)
    iters = torch.full((X.shape[0],), steps, dtype=torch.int64)
    active = None  # device bool mask of the matrices still iterating, once one has stopped
    B, stopped_all = None, False
    for k in range(steps):
        A = X @ X.mT
        if tol is not None and k and k % 2 == 0:
            newly = (_residual_of_gram(A) < tol).cpu() & (iters == steps)
            iters[newly] = k
            still = iters == steps
            if not bool(still.any()):
                stopped_all = True
                break
            if bool(newly.any()):
                active = still.to(X.device)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        Xn = torch.baddbmm(X, B, X, beta=a)
        X = Xn if active is None else torch.where(active[:, None, None], Xn, X)
    gram = None
    if output_gram:
        if stopped_all:
            gram = A  # every matrix frozen: A is computed from the outputs themselves
        else:
            gram = _output_gram(X, A, B, a)
            if active is not None:  # a frozen matrix's A is its output's Gram matrix
                gram = torch.where(active[:, None, None], gram, A)
    return (X.mT if tall else X), iters, gram


def ns_diagnostics(X: torch.Tensor, residual: bool = True, singular_values: bool = True,
                   frobenius: bool = False, gram_dtype: torch.dtype | None = None,
                   exact_below: int = 32, lanczos_steps: int = 16,
                   gram: torch.Tensor | None = None) -> NSDiagnostics:
    """Residual ||I - XX^T||_F/sqrt(m) (m the shorter side), singular value range and
    Frobenius norm of each matrix of ``X`` (``[..., m, n]``), all from one Gram matrix of
    the shorter side, formed in ``gram_dtype`` (default X's; pass NS's working dtype so a
    bf16 run does not pay an fp32 matmul) and read in float32.

    Singular values are exact (``eigvalsh``) when the shorter side is at most
    ``exact_below``, else Lanczos estimates, which lie inside the true range. ``gram``: the
    Gram matrix already at hand (``newton_schulz(..., output_gram=True)``), used instead.
    A matrix whose Gram matrix is not finite gets NaN figures (its Frobenius norm NaN or
    inf); an eigensolver failure gives NaN singular values; neither raises.
    """
    if not isinstance(X, torch.Tensor) or X.ndim < 2:
        raise ValueError(f"X must be a tensor with at least 2 dims [..., m, n], got "
                         f"{tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__}")
    if isinstance(exact_below, bool) or not isinstance(exact_below, int) or exact_below < 0:
        raise ValueError(f"exact_below must be an int >= 0, got {exact_below!r}")
    if isinstance(lanczos_steps, bool) or not isinstance(lanczos_steps, int) \
            or lanczos_steps < 2:
        raise ValueError(f"lanczos_steps must be an int >= 2, got {lanczos_steps!r}")
    if gram_dtype is not None and not (isinstance(gram_dtype, torch.dtype)
                                       and gram_dtype.is_floating_point):
        raise ValueError(f"gram_dtype must be None or a floating torch.dtype, "
                         f"got {gram_dtype!r}")
    if not (residual or singular_values or frobenius):
        return NSDiagnostics(None, None, None, None)
    k = min(X.shape[-2:])
    if gram is not None and (not isinstance(gram, torch.Tensor)
                             or tuple(gram.shape) != (*X.shape[:-2], k, k)):
        raise ValueError(f"gram must be None or a tensor of shape {(*X.shape[:-2], k, k)}, "
                         f"got {tuple(gram.shape) if isinstance(gram, torch.Tensor) else gram!r}")
    if gram is None:
        Xg = X if gram_dtype is None else X.to(gram_dtype)
        if Xg.shape[-2] > Xg.shape[-1]:
            Xg = Xg.mT
        gram = Xg @ Xg.mT
    A = gram.float()
    # a NaN/Inf Gram matrix (a non-finite gradient, an overflowing fp16 product) gives NaN
    # figures; eigvalsh would fail to converge on it, so it sees a zero matrix instead
    finite = torch.isfinite(A).flatten(-2).all(-1)
    nan = torch.tensor(math.nan, dtype=A.dtype, device=A.device)
    res = torch.where(finite, _residual_of_gram(A), nan) if residual else None
    lo = hi = None
    if singular_values:
        lo, hi = _sv_band(torch.where(finite[..., None, None], A, 0.0), exact_below,
                          lanczos_steps)
        lo = torch.where(finite, lo.clamp_min(0).sqrt(), nan)
        hi = torch.where(finite, hi.clamp_min(0).sqrt(), nan)
    fro = A.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt() if frobenius else None
    return NSDiagnostics(res, lo, hi, fro)


def _sv_band(A: torch.Tensor, exact_below: int, lanczos_steps: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Extreme eigenvalues of the finite Gram matrices ``A``; NaN where LAPACK gives up."""
    if A.shape[-1] <= exact_below:
        ev = finite_eigvalsh(A)
        return ev[..., 0], ev[..., -1]
    return lanczos_extreme_eigvalsh(A, lanczos_steps)
