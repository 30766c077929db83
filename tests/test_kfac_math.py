"""K-FAC's numeric cores against independent references: numpy's eigvalsh/inv/pinv and a
dense scipy solve with the Kronecker product."""

import numpy as np
import pytest
import scipy.linalg
import torch

from optimizers.kfac_math import (
    factored_damping,
    lowrank_natural_gradient,
    natural_gradient,
    woodbury_natural_gradient,
)
from optimizers.linalg import clipped_eigh, power_iteration, robust_cholesky_inverse
from optimizers.woodbury import LowRankEig, WoodburyInverse


def _spd(n, rank=None, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rank or 2 * n, n)) * scale
    return x.T @ x / x.shape[0]


def _clip_np(m, kappa):
    """Reference floor of a symmetric matrix's spectrum (numpy eigh)."""
    w, q = np.linalg.eigh(m)
    floor = w.max() / kappa if kappa else 0.0
    return (q * np.maximum(w, floor)) @ q.T, int((w < floor).sum())


# -- linalg --------------------------------------------------------------------------------

def test_clipped_eigh_matches_numpy_eigvalsh():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    w = np.logspace(-9, 0, 12)  # well separated: which side of the floor is unambiguous
    m = (q * w) @ q.T
    for kappa, expected in [(1e3, int((w < 1e-3).sum())), (1e6, int((w < 1e-6).sum())),
                            (None, 0)]:
        vals, vecs, clipped = clipped_eigh(torch.tensor(m), kappa)
        ref = np.linalg.eigvalsh(m)
        floor = ref.max() / kappa if kappa else 0.0
        assert int(clipped) == expected == int((ref < floor).sum())
        np.testing.assert_allclose(vals.numpy(), np.maximum(ref, floor), rtol=1e-9,
                                   atol=1e-15)
        if kappa:
            assert vals.max() / vals.min() <= kappa * (1 + 1e-9)
        np.testing.assert_allclose((vecs * vals) @ vecs.T, _clip_np(m, kappa)[0], atol=1e-12)


def test_clipped_eigh_counts_negative_rounding_noise_without_condition():
    m = np.diag([2.0, 1.0, -1e-12])
    vals, _, clipped = clipped_eigh(torch.tensor(m))
    assert int(clipped) == 1 and float(vals.min()) == 0.0


def test_robust_cholesky_inverse_spd_is_plain_cholesky():
    m = _spd(8)
    inv, jitter = robust_cholesky_inverse(torch.tensor(m))
    assert jitter == 0.0
    np.testing.assert_allclose(inv.numpy(), np.linalg.inv(m), rtol=1e-9, atol=1e-12)


def test_robust_cholesky_inverse_singular_backs_off_with_jitter():
    m = np.ones((4, 4), dtype=np.float32)  # rank 1: plain Cholesky fails on a zero pivot
    inv, jitter = robust_cholesky_inverse(torch.tensor(m))
    eps = float(np.finfo(np.float32).eps)
    # one of the schedule's values eps, 10 eps, ..., 1e4 eps (times the mean diagonal, 1)
    k = np.log10(jitter / eps)
    assert jitter > 0 and abs(k - round(k)) < 1e-6 and 0 <= round(k) <= 4
    assert bool(torch.isfinite(inv).all())
    inv = inv.double().numpy()
    np.testing.assert_allclose(inv, inv.T, rtol=1e-6)
    # (m + jI)⁻¹ is ~1/j on m's null space and 1/(4 + j) on its range (ones/2): numpy's
    # eigh of m tells the two apart
    w, q = np.linalg.eigh(m.astype(np.float64))
    null, rng = q[:, w < 0.5], q[:, w > 0.5]
    assert np.linalg.norm(inv @ rng) <= 1e-5 * np.linalg.norm(inv @ null)
    assert np.linalg.norm(null.T @ inv @ null) >= 0.1 / jitter


def test_robust_cholesky_inverse_falls_back_to_pinv():
    m = np.diag([1.0, -3.0, 2.0])  # indefinite: no small jitter makes it factor
    inv, jitter = robust_cholesky_inverse(torch.tensor(m))
    assert jitter == -1.0
    np.testing.assert_allclose(inv.numpy(), np.linalg.pinv(m), atol=1e-12)


def test_robust_cholesky_inverse_never_raises_on_non_finite():
    m = torch.tensor([[1.0, float("nan")], [float("nan"), float("inf")]])
    inv, jitter = robust_cholesky_inverse(m)
    assert bool(torch.isfinite(inv).all())
    assert jitter == -1.0 or jitter >= 0


def test_power_iteration_matches_eigvalsh_max():
    m = _spd(30, seed=3)
    est = float(power_iteration(torch.tensor(m), iters=200))
    assert est == pytest.approx(np.linalg.eigvalsh(m).max(), rel=1e-8)
    assert est <= np.linalg.eigvalsh(m).max() * (1 + 1e-12)


@pytest.mark.parametrize("fn,args", [
    (clipped_eigh, (torch.zeros(2, 3),)),
    (clipped_eigh, (torch.eye(2), 0.5)),
    (robust_cholesky_inverse, (torch.zeros(3),)),
    (robust_cholesky_inverse, (torch.eye(2), 0)),
    (power_iteration, (torch.eye(2), 0)),
])
def test_linalg_rejects_bad_input(fn, args):
    with pytest.raises(ValueError):
        fn(*args)


# -- natural gradient (eig path) -----------------------------------------------------------

@pytest.mark.parametrize("kappa", [None, 1e3])
def test_natural_gradient_equals_dense_kronecker_solve(kappa):
    out_dim, in_dim, d = 5, 7, 1e-2
    A = _spd(in_dim, rank=4, seed=1)  # rank deficient: clipping and damping both matter
    G = _spd(out_dim, rank=3, seed=2)
    V = np.random.default_rng(3).standard_normal((out_dim, in_dim))
    ng = natural_gradient(torch.tensor(V), torch.tensor(A), torch.tensor(G), d, kappa)
    Ac, _ = _clip_np(A, kappa)
    Gc, _ = _clip_np(G, kappa)
    # row-major vec: vec(G X A) = (G ⊗ A) vec(X) for symmetric A
    F = np.kron(Gc, Ac) + d * np.eye(out_dim * in_dim)
    ref = scipy.linalg.solve(F, V.ravel(), assume_a="pos").reshape(out_dim, in_dim)
    np.testing.assert_allclose(ng.numpy(), ref, rtol=1e-8, atol=1e-10)


def test_natural_gradient_tiny_damping_is_finite():
    A = _spd(6, rank=2)
    G = _spd(4, rank=1)
    V = torch.randn(4, 6, dtype=torch.float64)
    ng = natural_gradient(V, torch.tensor(A), torch.tensor(G), 1e-10)
    assert bool(torch.isfinite(ng).all())
    ng32 = natural_gradient(V.float(), torch.tensor(A).float(), torch.tensor(G).float(), 1e-10,
                            max_condition=1e6)
    assert bool(torch.isfinite(ng32).all())


@pytest.mark.parametrize("kwargs,match", [
    (dict(grad=torch.zeros(3)), "grad"),
    (dict(A=torch.eye(4)), "A"),
    (dict(G=torch.eye(2)), "G"),
    (dict(damping=-1.0), "damping"),
    (dict(damping=float("nan")), "damping"),
    (dict(max_condition=0.5), "max_condition"),
])
def test_natural_gradient_rejects_bad_input(kwargs, match):
    args = dict(grad=torch.zeros(3, 5), A=torch.eye(5), G=torch.eye(3), damping=1e-3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        natural_gradient(**args)


# -- Woodbury ------------------------------------------------------------------------------

@pytest.mark.parametrize("n,T", [(40, 6), (10, 25)])
def test_woodbury_inverse_equals_dense_inverse(n, T):
    rng = np.random.default_rng(4)
    U = rng.standard_normal((n, T)) * 3.0
    lam = 0.05
    w = WoodburyInverse(torch.tensor(U), T, lam)
    ref = np.linalg.inv(U @ U.T / T + lam * np.eye(n))
    np.testing.assert_allclose(w.dense().numpy(), ref, rtol=1e-9, atol=1e-10)
    X = rng.standard_normal((n, 3))
    np.testing.assert_allclose(w.apply(torch.tensor(X)).numpy(), ref @ X, rtol=1e-9,
                               atol=1e-10)
    assert w.jitter == 0.0
    lmax = np.linalg.eigvalsh(U @ U.T / T).max()
    assert float(w.lam_max) == pytest.approx(lmax, rel=1e-3)  # power iteration


def test_woodbury_raises_lambda_to_respect_max_condition():
    rng = np.random.default_rng(5)
    U = rng.standard_normal((30, 4))
    w = WoodburyInverse(torch.tensor(U), 4, 1e-9, max_condition=100.0)
    lmax = np.linalg.eigvalsh(U @ U.T / 4).max()
    assert float(w.lam) == pytest.approx(lmax / 99.0, rel=1e-4)
    assert float(w.condition()) == pytest.approx(100.0, rel=1e-4)
    ref = np.linalg.inv(U @ U.T / 4 + float(w.lam) * np.eye(30))
    np.testing.assert_allclose(w.dense().numpy(), ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_woodbury_low_precision_storage_is_exact_for_the_stored_factor(dtype, rtol):
    rng = np.random.default_rng(6)
    U = torch.tensor(rng.standard_normal((64, 8)) * 1e3, dtype=torch.float32)  # fp16 range
    w = WoodburyInverse(U, 8, 0.5, store_dtype=dtype)
    assert w.U.dtype == dtype and w.nbytes == 64 * 8 * U.new_empty((), dtype=dtype)\
        .element_size() + 8 * 8 * 4
    Ur = w.rows().double().numpy()  # the rounded factor the operator inverts
    ref = np.linalg.inv(Ur @ Ur.T / 8 + 0.5 * np.eye(64))
    np.testing.assert_allclose(w.dense().double().numpy(), ref, rtol=1e-3, atol=1e-6)
    exact = np.linalg.inv(U.double().numpy() @ U.double().numpy().T / 8 + 0.5 * np.eye(64))
    np.testing.assert_allclose(w.dense().double().numpy(), exact, rtol=rtol, atol=rtol * 2)


def test_woodbury_tiny_lambda_is_finite():
    U = torch.randn(50, 10)
    U[:, 5:] = U[:, :5]  # duplicated columns: UᵀU singular, S badly scaled at lam=1e-10
    w = WoodburyInverse(U, 10, 1e-10)
    out = w.apply(torch.randn(50, 3))
    assert bool(torch.isfinite(out).all())
    assert w.jitter >= 0 or w.jitter == -1.0


@pytest.mark.parametrize("kwargs", [dict(U=torch.zeros(3)), dict(tokens=0), dict(lam=0.0),
                                    dict(lam=torch.ones(2)), dict(store_dtype=torch.int8),
                                    dict(max_condition=1.0)])
def test_woodbury_rejects_bad_input(kwargs):
    args = dict(U=torch.ones(4, 2), tokens=2, lam=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        WoodburyInverse(**args)


def _factored_reference(V, A, U, d):
    T = U.shape[1]
    G = U @ U.T / T
    pi = np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
    dA, dG = pi * np.sqrt(d), np.sqrt(d) / pi
    return G, dA, dG


def test_woodbury_equals_eig_with_the_same_damping():
    out_dim, in_dim, T, d = 24, 6, 5, 1e-3
    rng = np.random.default_rng(7)
    A = _spd(in_dim, seed=8)
    U = rng.standard_normal((out_dim, T))
    V = rng.standard_normal((out_dim, in_dim))
    wood = woodbury_natural_gradient(torch.tensor(V), torch.tensor(A), torch.tensor(U), d)
    G, dA, dG = _factored_reference(V, A, U, d)
    # the eig path given the same (factored) damping, folded into the factors
    eig = natural_gradient(torch.tensor(V), torch.tensor(A + dA * np.eye(in_dim)),
                           torch.tensor(G + dG * np.eye(out_dim)), 0.0)
    np.testing.assert_allclose(wood.numpy(), eig.numpy(), rtol=1e-9, atol=1e-11)
    F = np.kron(G + dG * np.eye(out_dim), A + dA * np.eye(in_dim))
    ref = scipy.linalg.solve(F, V.ravel(), assume_a="pos").reshape(out_dim, in_dim)
    np.testing.assert_allclose(wood.numpy(), ref, rtol=1e-8, atol=1e-10)


def test_factored_damping_multiplies_to_damping():
    dA, dG = factored_damping(torch.tensor(4.0), torch.tensor(0.25), 1e-2)
    assert float(dA * dG) == pytest.approx(1e-2)
    assert float(dA / dG) == pytest.approx(16.0)  # π² = mean A / mean G
    dA, dG = factored_damping(0.0, 1.0, 1e-2)  # degenerate factor: no split
    assert float(dA) == float(dG) == pytest.approx(0.1)


# -- low-rank G with exact Tikhonov damping (G's eigenpairs from the T x T Gram) ---------------

@pytest.mark.parametrize("n,T,kappa,d", [(20, 5, None, 1e-3), (20, 5, 50.0, 1e-3),
                                         (6, 10, None, 1e-2), (6, 10, 30.0, 1e-2),
                                         (30, 8, 1e6, 1e-6)])
def test_lowrank_natural_gradient_equals_dense_kronecker_solve(n, T, kappa, d):
    """(G_c ⊗ A_c + d I)⁻¹ vec(V) with G = U Uᵀ / T, G and A clipped by numpy's eigh, solved
    densely by scipy: T < n (G singular) and T > n, with and without max_condition."""
    rng = np.random.default_rng(n + T)
    U = rng.standard_normal((n, T)) * 3
    A = _spd(7, seed=T)
    V = rng.standard_normal((n, 7))
    Gc, _ = _clip_np(U @ U.T / T, kappa)
    Ac, _ = _clip_np(A, kappa)
    F = np.kron(Gc, Ac) + d * np.eye(n * 7)
    ref = scipy.linalg.solve(F, V.ravel(), assume_a="pos").reshape(V.shape)
    got = lowrank_natural_gradient(torch.tensor(V), torch.tensor(A), torch.tensor(U), d, kappa)
    assert np.linalg.norm(got.numpy() - ref) <= 1e-8 * np.linalg.norm(ref)
    got32 = lowrank_natural_gradient(torch.tensor(V).float(), torch.tensor(A).float(),
                                     torch.tensor(U).float(), d, kappa)
    assert np.linalg.norm(got32.double().numpy() - ref) <= 1e-3 * np.linalg.norm(ref)


@pytest.mark.parametrize("n,T,kappa", [(20, 5, 50.0), (6, 10, 30.0), (20, 5, None)])
def test_lowrank_eig_spectrum_against_eigvalsh(n, T, kappa):
    rng = np.random.default_rng(3)
    U = rng.standard_normal((n, T))
    w = np.linalg.eigvalsh(U @ U.T / T)
    floor = w.max() / kappa if kappa else 0.0
    low = LowRankEig(torch.tensor(U), T, max_condition=kappa)
    assert float(low.lam_max) == pytest.approx(w.max(), rel=1e-10)
    assert float(low.lam_min) == pytest.approx(max(w.min(), floor), rel=1e-6, abs=1e-12)
    assert float(low.mean) == pytest.approx(np.maximum(w, floor).mean(), rel=1e-10)
    if kappa:
        assert int(low.clipped) == int((w < floor).sum())
    np.testing.assert_allclose(low.rows().numpy(), U, rtol=1e-12)


def test_lowrank_rejects_bad_input():
    with pytest.raises(ValueError, match="U must be"):
        lowrank_natural_gradient(torch.ones(3, 2), torch.eye(2), torch.ones(4, 2), 1e-3)
    with pytest.raises(ValueError, match="damping"):
        lowrank_natural_gradient(torch.ones(3, 2), torch.eye(2), torch.ones(3, 2), 0.0)
    with pytest.raises(ValueError, match="tokens"):
        LowRankEig(torch.ones(3, 2), 0)
