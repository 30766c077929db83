"""K-FAC's pure math: the natural gradient of one layer from its Kronecker factors.

The layer's Fisher block is approximated by ``G ⊗ A`` (``A = E[a aᵀ]`` over the layer's
inputs, ``G = E[g gᵀ]`` over its output gradients); the gradient ``V`` ``[out, in]`` is
preconditioned as ``(G ⊗ A + damping I)⁻¹ vec(V)`` (eig path; for a low-rank ``G = U Uᵀ/T``
the same step from G's eigenpairs out of the ``T x T`` Gram) or with the damping split
between the factors, ``(G + δ_G I)⁻¹ V (A + δ_A I)⁻¹`` (Woodbury's factored damping, through a
``T x T`` Cholesky).
"""

from __future__ import annotations

import math

import torch

from optimizers.linalg import clipped_eigh
from optimizers.woodbury import LowRankEig, WoodburyInverse


def _check_square(name: str, m: object, n: int | None = None) -> None:
    if not isinstance(m, torch.Tensor) or m.ndim != 2 or m.shape[0] != m.shape[1] \
            or m.shape[0] == 0:
        shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(f"{name} must be a non-empty square 2-D tensor, got {shape}")
    if n is not None and m.shape[0] != n:
        raise ValueError(f"{name} must be {n} x {n} to match grad, got {tuple(m.shape)}")


def _check_grad(grad: object) -> None:
    if not isinstance(grad, torch.Tensor) or grad.ndim != 2 or 0 in grad.shape:
        shape = tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
        raise ValueError(f"grad must be a non-empty 2-D tensor [out, in], got {shape}")


def _check_damping(damping: object, allow_zero: bool) -> None:
    ok = isinstance(damping, (int, float)) and not isinstance(damping, bool) \
        and math.isfinite(damping) and (damping >= 0 if allow_zero else damping > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"damping must be a finite number {bound}, got {damping!r}")


def _check_condition(max_condition: object) -> None:
    if max_condition is not None and not (isinstance(max_condition, (int, float))
                                          and not isinstance(max_condition, bool)
                                          and max_condition > 1):
        raise ValueError(f"max_condition must be a number > 1 or None, got {max_condition!r}")


def eig_precondition(grad: torch.Tensor, QA: torch.Tensor, lA: torch.Tensor, QG: torch.Tensor,
                     lG: torch.Tensor, damping: float) -> torch.Tensor:
    """``Q_G[(Q_Gᵀ grad Q_A) / (λ_G λ_Aᵀ + damping)]Q_Aᵀ`` from given eigendecompositions."""
    inner = QG.mT @ grad @ QA
    return QG @ (inner / (lG[:, None] * lA[None, :] + damping)) @ QA.mT


def natural_gradient(grad: torch.Tensor, A: torch.Tensor, G: torch.Tensor, damping: float,
                     max_condition: float | None = None) -> torch.Tensor:
    """``(G ⊗ A + damping I)⁻¹ vec(grad)`` through eigendecompositions of ``A`` and ``G``,
    their eigenvalues first floored so that neither factor's condition exceeds
    ``max_condition``: ``Q_G[(Q_Gᵀ grad Q_A) / (λ_G λ_Aᵀ + damping)]Q_Aᵀ``."""
    _check_grad(grad)
    _check_square("A", A, grad.shape[1])
    _check_square("G", G, grad.shape[0])
    _check_damping(damping, allow_zero=True)
    _check_condition(max_condition)
    lA, QA, _ = clipped_eigh(A, max_condition)
    lG, QG, _ = clipped_eigh(G, max_condition)
    return eig_precondition(grad, QA, lA, QG, lG, damping)


def factored_damping(mean_eig_A: torch.Tensor | float, mean_eig_G: torch.Tensor | float,
                     damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``damping`` between the factors: ``δ_A = π √d``, ``δ_G = √d / π`` with
    ``π = sqrt(mean eig A / mean eig G)`` (Martens & Grosse 2015, §6.3); ``δ_A δ_G = d``."""
    mA = torch.as_tensor(mean_eig_A, dtype=torch.float64)
    mG = torch.as_tensor(mean_eig_G, dtype=mA.dtype, device=mA.device)
    tiny = torch.finfo(mA.dtype).tiny
    pi = torch.where((mA > 0) & (mG > 0) & torch.isfinite(mA) & torch.isfinite(mG),
                     torch.sqrt(mA.clamp_min(tiny) / mG.clamp_min(tiny)), torch.ones_like(mA))
    root = math.sqrt(damping)
    return pi * root, root / pi


def damped_condition(eigenvalues: torch.Tensor, delta: torch.Tensor | float) -> torch.Tensor:
    """``(λ_max + δ) / (λ_min + δ)``: a factor's condition number after damping ``δ``."""
    lo, hi = eigenvalues.min(), eigenvalues.max()
    return (hi + delta) / (lo + delta)


def _check_lowrank(grad, A, U, damping, max_condition) -> None:
    _check_grad(grad)
    _check_square("A", A, grad.shape[1])
    if not isinstance(U, torch.Tensor) or U.ndim != 2 or U.shape[0] != grad.shape[0] \
            or U.shape[1] == 0:
        shape = tuple(U.shape) if isinstance(U, torch.Tensor) else type(U).__name__
        raise ValueError(f"U must be a 2-D tensor [out={grad.shape[0]}, T >= 1], got {shape}")
    _check_damping(damping, allow_zero=False)
    _check_condition(max_condition)


def woodbury_natural_gradient(grad: torch.Tensor, A: torch.Tensor, U: torch.Tensor,
                              damping: float, max_condition: float | None = None
                              ) -> torch.Tensor:
    """``(U Uᵀ/T + δ_G I)⁻¹ grad (A_c + δ_A I)⁻¹`` for ``U`` ``[out, T]``, with the damping
    split by :func:`factored_damping`, ``A_c`` clipped to ``max_condition`` and ``δ_G`` raised
    where needed to keep the G side within it too."""
    _check_lowrank(grad, A, U, damping, max_condition)
    lA, QA, _ = clipped_eigh(A, max_condition)
    tokens = U.shape[1]
    mean_G = (U * U).sum() / (tokens * U.shape[0])
    dA, dG = factored_damping(lA.mean(), mean_G, damping)
    dA, dG = dA.to(lA.dtype), dG.to(lA.dtype)
    wood = WoodburyInverse(U, tokens, dG, max_condition=max_condition)
    A_inv = (QA / (lA + dA)) @ QA.mT
    return wood.apply(grad @ A_inv)


def lowrank_natural_gradient(grad: torch.Tensor, A: torch.Tensor, U: torch.Tensor,
                             damping: float, max_condition: float | None = None
                             ) -> torch.Tensor:
    """``(G_c ⊗ A_c + damping I)⁻¹ vec(grad)`` for ``G = U Uᵀ/T`` (``U`` ``[out, T]``): the
    same step as :func:`natural_gradient` on the dense ``G`` (both factors clipped to
    ``max_condition``, exact Tikhonov damping), with G's eigenpairs from the ``T x T`` Gram
    (:class:`optimizers.woodbury.LowRankEig`) instead of an ``out x out`` eigh."""
    _check_lowrank(grad, A, U, damping, max_condition)
    lA, QA, _ = clipped_eigh(A, max_condition)
    low = LowRankEig(U, U.shape[1], max_condition=max_condition)
    return low.apply(grad @ QA, lA, damping) @ QA.mT
