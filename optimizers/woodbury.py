"""The inverse of a damped low-rank factor ``G = U Uᵀ / T + λ I`` by the Woodbury identity.

With ``U`` of shape ``[n, T]`` and few rows ``T``, ``G⁻¹ = (I - U S⁻¹ Uᵀ / (λ T)) / λ`` where
``S = I + Uᵀ U / (λ T)`` is only ``T x T``: an ``n x n`` eigendecomposition becomes a ``T x T``
Cholesky. ``U`` may be stored in a low precision and off the compute device; ``S⁻¹`` is built
from the stored (rounded) ``U``, so the operator is the exact inverse of the stored factor.
"""

from __future__ import annotations

import torch

from optimizers.linalg import clipped_eigh, power_iteration, robust_cholesky_inverse

STORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _scaled_store(U: torch.Tensor, tokens, max_condition, store_dtype):
    """Checked arguments, then (compute dtype, scale, ``U / scale`` in ``store_dtype``, that
    stored value back in the compute dtype): factors are built from the rounded values
    ``apply`` will see, so the operator is exact for what is stored."""
    if not isinstance(U, torch.Tensor) or U.ndim != 2 or 0 in U.shape:
        raise ValueError(f"U must be a non-empty 2-D tensor [n, T], got "
                         f"{tuple(U.shape) if isinstance(U, torch.Tensor) else U!r}")
    if not isinstance(tokens, (int, float)) or isinstance(tokens, bool) or tokens <= 0:
        raise ValueError(f"tokens must be a number > 0, got {tokens!r}")
    if max_condition is not None and not (isinstance(max_condition, (int, float))
                                          and not isinstance(max_condition, bool)
                                          and max_condition > 1):
        raise ValueError(f"max_condition must be a number > 1 or None, got {max_condition!r}")
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of float32, float16, bfloat16, "
                         f"got {store_dtype!r}")
    compute = torch.float64 if U.dtype == torch.float64 else torch.float32
    Uc = U.detach().to(compute)
    # scaling by the largest entry keeps fp16 storage clear of overflow and underflow
    scale = Uc.abs().amax().clamp_min(torch.finfo(compute).tiny)
    # float64 factors stay float64 unless a lower precision is asked for explicitly
    keep64 = compute == torch.float64 and store_dtype == torch.float32
    store = (Uc / scale).to(compute if keep64 else store_dtype)
    return compute, scale, store, store.to(compute)


class WoodburyInverse:
    """``(U Uᵀ / T + lam I)⁻¹`` for ``U`` ``[n, T]``; ``apply(X)`` multiplies ``X`` ``[n, m]``.

    ``jitter`` is the Cholesky jitter that succeeded (0 none, -1 pinv fallback), ``lam_max``
    a power-iteration estimate of the largest eigenvalue of ``U Uᵀ / T`` (0-d tensor). With
    ``max_condition``, ``lam`` is raised to ``lam_max / (max_condition - 1)`` when smaller, so
    the damped factor's condition ``(lam_max + lam) / lam`` stays within the bound.
    """

    def __init__(self, U: torch.Tensor, tokens: int | float, lam: float | torch.Tensor,
                 store_dtype: torch.dtype = torch.float32,
                 store_device: torch.device | str | None = None, pin: bool = False,
                 max_condition: float | None = None) -> None:
        if isinstance(lam, torch.Tensor):
            if lam.numel() != 1:
                raise ValueError(f"lam must be a scalar, got shape {tuple(lam.shape)}")
        elif not isinstance(lam, (int, float)) or isinstance(lam, bool) or not lam > 0:
            raise ValueError(f"lam must be a number > 0, got {lam!r}")
        compute, scale, store, Us = _scaled_store(U, tokens, max_condition, store_dtype)
        gram = Us.mT @ Us
        self.tokens = float(tokens)
        self.lam_max = power_iteration(gram, iters=50) * (scale * scale / self.tokens)
        self.trace = gram.diagonal().sum() * (scale * scale / self.tokens)
        lam = lam.to(device=U.device, dtype=compute).reshape(()) \
            if isinstance(lam, torch.Tensor) else torch.tensor(float(lam), dtype=compute,
                                                               device=U.device)
        if max_condition is not None:
            # (λ_max + λ) / λ <= max_condition: raise λ rather than clip (no eigenbasis here)
            lam = torch.maximum(lam, self.lam_max / (max_condition - 1))
        self.lam = lam
        self.coef = scale * scale / (self.lam * self.tokens)  # U = scale * Us
        S = torch.eye(gram.shape[0], dtype=compute, device=U.device) + gram * self.coef
        self.S_inv, self.jitter = robust_cholesky_inverse(S)
        self.compute_dtype = compute
        self.scale = scale
        dev = U.device if store_device is None else torch.device(store_device)
        self.U = store.to(dev)
        self.S_inv = self.S_inv.to(dev)
        if pin and dev.type == "cpu" and torch.cuda.is_available():
            self.U, self.S_inv = self.U.pin_memory(), self.S_inv.pin_memory()

    def condition(self) -> torch.Tensor:
        """``(λ_max + lam) / lam``: the damped factor's condition number (exact when
        ``T < n``, where the smallest eigenvalue of ``U Uᵀ/T`` is 0; an upper bound otherwise)."""
        return (self.lam_max + self.lam) / self.lam

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored ``U`` and ``S⁻¹``."""
        return self.U.numel() * self.U.element_size() \
            + self.S_inv.numel() * self.S_inv.element_size()

    @property
    def device(self) -> torch.device:
        """Where ``U`` is stored."""
        return self.U.device

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """``G⁻¹ X`` for ``X`` ``[n, m]``, computed on ``X``'s device."""
        U = self.U.to(device=X.device, dtype=self.compute_dtype, non_blocking=True)
        S_inv = self.S_inv.to(device=X.device, non_blocking=True)
        Xc = X.to(self.compute_dtype)
        coef = self.coef.to(X.device)
        lam = self.lam.to(X.device)
        inner = S_inv @ (U.mT @ Xc)
        return ((Xc - (U @ inner) * coef) / lam).to(X.dtype)

    def rows(self) -> torch.Tensor:
        """The stored ``U`` ``[n, T]`` (as rounded to the storage dtype), in the compute dtype."""
        return self.U.to(self.scale.device, self.compute_dtype) * self.scale

    def dense(self) -> torch.Tensor:
        """The full ``n x n`` inverse (for tests and small factors)."""
        n = self.U.shape[0]
        eye = torch.eye(n, dtype=self.compute_dtype, device=self.S_inv.device)
        return self.apply(eye)


class LowRankEig:
    """The eigenpairs of a low-rank factor ``G = U Uᵀ / T`` (``U`` ``[n, T]``) from its
    ``T x T`` Gram, for the eig path's exact Tikhonov step without an ``n x n`` eigh.

    ``Uᵀ U = W diag(σ) Wᵀ`` gives ``G = Σ_k μ_k p_k p_kᵀ`` with ``μ_k = σ_k / T``,
    ``p_k = U w_k / √σ_k``; the rest of G's spectrum (``n - rank``) is 0. With
    ``max_condition``, eigenvalues below ``μ_max / max_condition`` (those zeros included) are
    raised to that floor ``f``, as :func:`optimizers.linalg.clipped_eigh` does for a dense G.
    ``apply(V', λ_A, damping)`` then solves ``(G_c ⊗ A_c + damping I) X = V`` in A's
    eigenbasis (``V' = V Q_A``, ``X = X' Q_Aᵀ``): per column ``j``,
    ``X'_j = V'_j / (f a_j + d) + U W [(Wᵀ Uᵀ V'_j) ⊙ (f - μ)/σ · a_j / ((μ a_j + d)(f a_j + d))]``
    (the bracket 0 where ``μ_k <= f``), no division by a vanishing ``σ``. ``U`` is stored like
    :class:`WoodburyInverse`'s (scaled by its largest entry, in ``store_dtype``, possibly on
    the host) and the Gram is built from the stored, rounded values.
    """

    def __init__(self, U: torch.Tensor, tokens: int | float, max_condition: float | None = None,
                 store_dtype: torch.dtype = torch.float32,
                 store_device: torch.device | str | None = None, pin: bool = False) -> None:
        compute, scale, store, Us = _scaled_store(U, tokens, max_condition, store_dtype)
        sigma, W, _ = clipped_eigh(Us.mT @ Us)  # σ >= 0 in units of scale², ascending
        n, t = U.shape
        self.tokens = float(tokens)
        mu = sigma * (scale * scale / self.tokens)
        lam_max = mu[-1].clamp_min(0)
        floor = lam_max / max_condition if max_condition is not None else lam_max * 0
        # G's n eigenvalues: the Gram's largest min(n, T) (with T > n the other T - n are
        # zeros of the Gram alone, their U w_k = 0) and n - T exact zeros when T < n
        null = max(n - t, 0)
        top = mu[t - min(n, t):]
        self.clipped = (top < floor).sum() + (floor > 0).to(torch.int64) * null
        self.lam_max = lam_max
        self.lam_min = torch.maximum(top.min() if not null else lam_max * 0, floor)
        #: mean eigenvalue of the clipped G over all n (the damping split's π uses it)
        self.mean = (torch.maximum(top, floor).sum() + floor * null) / n
        live = mu > floor
        # (f - μ)/σ = f/σ - scale²/T, where σ > 0 (μ > f >= 0); 0 elsewhere
        self.coef = torch.where(live, (floor - mu) / torch.where(live, sigma, 1.0), 0.0)
        self.mu = torch.maximum(mu, floor)
        self.floor = floor
        self.jitter = 0.0
        self.compute_dtype = compute
        self.scale = scale
        dev = U.device if store_device is None else torch.device(store_device)
        self.U = store.to(dev)
        self.W = W.to(dev)
        if pin and dev.type == "cpu" and torch.cuda.is_available():
            self.U, self.W = self.U.pin_memory(), self.W.pin_memory()

    def condition(self) -> torch.Tensor:
        """``λ_max / λ_min`` of the clipped G (undamped; inf for a singular G)."""
        return self.lam_max / self.lam_min

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored ``U`` and ``W``."""
        return self.U.numel() * self.U.element_size() + self.W.numel() * self.W.element_size()

    @property
    def device(self) -> torch.device:
        """Where ``U`` is stored."""
        return self.U.device

    def apply(self, Vp: torch.Tensor, lA: torch.Tensor, damping: float) -> torch.Tensor:
        """``X'`` with ``(G_c ⊗ diag(lA) + damping I) X' = Vp`` for ``Vp`` ``[n, m]`` (a
        gradient in A's eigenbasis, ``lA`` A's clipped eigenvalues), on ``Vp``'s device."""
        dev, dt = Vp.device, self.compute_dtype
        U = self.U.to(device=dev, dtype=dt, non_blocking=True)
        W = self.W.to(device=dev, non_blocking=True)
        Vc = Vp.to(dt)
        a = lA.to(device=dev, dtype=dt)[None, :]
        mu, f = self.mu.to(dev)[:, None], self.floor.to(dev)
        base = f * a + damping                                     # [1, m]
        C = self.coef.to(dev)[:, None] * a / ((mu * a + damping) * base)   # [T, m]
        inner = W @ ((W.mT @ (U.mT @ Vc)) * C)
        return (Vc / base + U @ inner).to(Vp.dtype)

    def rows(self) -> torch.Tensor:
        """The stored ``U`` ``[n, T]`` (as rounded to the storage dtype), in the compute dtype."""
        return self.U.to(self.scale.device, self.compute_dtype) * self.scale
