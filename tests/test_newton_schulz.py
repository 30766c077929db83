"""Newton-Schulz against independent references: scipy's SVD polar factor, numpy residuals."""

import numpy as np
import pytest
import scipy.linalg
import torch

from optimizers.linalg import lanczos_extreme_eigvalsh
from optimizers.newton_schulz import (
    DEFAULT_COEFFICIENTS,
    newton_schulz,
    ns_diagnostics,
    orthogonalize,
    resolve_ns_dtype,
)

CONVERGENT = (1.875, -1.25, 0.375)  # the classic quintic: converges to the polar factor


def scalar_map(s: np.ndarray, steps: int, coefficients=DEFAULT_COEFFICIENTS) -> np.ndarray:
    """What NS does to each singular value of G / ||G||_F, in float64."""
    a, b, c = coefficients
    x = s / np.sqrt((s ** 2).sum())
    for _ in range(steps):
        x = a * x + b * x ** 3 + c * x ** 5
    return x


def with_spectrum(m: int, n: int, s: np.ndarray, seed: int) -> torch.Tensor:
    """An m x n matrix with singular values ``s`` and random singular vectors (scipy QR)."""
    rng = np.random.default_rng(seed)
    u, _ = scipy.linalg.qr(rng.standard_normal((m, m)))
    v, _ = scipy.linalg.qr(rng.standard_normal((n, n)))
    k = min(m, n)
    return torch.from_numpy((u[:, :k] * s) @ v[:, :k].T).float()


def svals(x: torch.Tensor) -> np.ndarray:
    return scipy.linalg.svd(x.double().numpy(), compute_uv=False)


def direct_residual(x: torch.Tensor) -> float:
    """||I - X X^T||_F / sqrt(m) on the shorter side, in float64 numpy."""
    a = x.double().numpy()
    if a.shape[0] > a.shape[1]:
        a = a.T
    m = a.shape[0]
    return float(np.linalg.norm(np.eye(m) - a @ a.T) / np.sqrt(m))


@pytest.mark.parametrize("m,n", [(48, 48), (40, 96), (96, 40)])
def test_output_is_polar_factor_with_mapped_singular_values(m, n):
    rng = np.random.default_rng(m + n)
    s = np.exp(rng.uniform(np.log(0.01), 0.0, min(m, n)))
    G = with_spectrum(m, n, s, seed=m * n)
    X = orthogonalize(G).X
    u, sg, vt = scipy.linalg.svd(G.double().numpy(), full_matrices=False)
    expected = (u * scalar_map(sg, 5)) @ vt  # U phi^5(S) V^T, from scipy's SVD of G
    np.testing.assert_allclose(X.double().numpy(), expected, atol=2e-4)
    polar = u @ vt
    cos = (X.double().numpy() * polar).sum() / (np.linalg.norm(X.double().numpy())
                                                * np.linalg.norm(polar))
    assert cos > 0.97


def test_five_steps_land_in_the_measured_band():
    # measured: every singular value >= 0.0015 ||G||_F ends in [0.6818, 1.2024] after 5 steps
    rng = np.random.default_rng(1)
    outs = []
    for m, n in [(32, 96), (64, 128), (128, 64), (100, 400)]:
        outs.append(svals(orthogonalize(torch.from_numpy(rng.standard_normal((m, n)))
                                        .float()).X))
    s = np.geomspace(0.01, 1.0, 64)  # a square matrix whose spectrum nears the band's edge
    assert (s / np.linalg.norm(s)).min() > 0.0015
    outs.append(svals(orthogonalize(with_spectrum(64, 64, s, seed=3)).X))
    allv = np.concatenate(outs)
    assert allv.min() >= 0.68 and allv.max() <= 1.21
    # below the edge a singular value is not lifted: 5 steps multiply it by about a^5 = 486
    tiny = np.full(16, 1e-5)
    tiny[0] = 1.0
    out = svals(orthogonalize(with_spectrum(16, 16, tiny, seed=4)).X)
    assert out.min() < 0.01
    np.testing.assert_allclose(np.sort(out), np.sort(scalar_map(tiny, 5)), rtol=1e-2)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (3, 16, 48), (2, 2, 30, 12)])
def test_residual_matches_direct_computation(shape):
    G = torch.randn(*shape)
    X = orthogonalize(G).X
    d = ns_diagnostics(X, singular_values=False)
    mats = X.reshape(-1, *shape[-2:])
    expected = np.array([direct_residual(x) for x in mats]).reshape(shape[:-2])
    np.testing.assert_allclose(d.residual.numpy(), expected, rtol=1e-5)
    assert d.sv_min is None and d.sv_max is None


@pytest.mark.parametrize("shape,tol", [((24, 96), None), ((96, 24), None), ((40, 40), None),
                                       ((3, 24, 96), None), ((4, 24, 60), 1e-3)])
def test_output_gram_equals_direct_product(shape, tol):
    # wide (n >= 2m) outputs get their Gram matrix from the last iteration's m x m matrices
    G = torch.randn(*shape)
    if len(shape) == 3:  # different conditioning: with tol some matrices freeze early
        G[1] *= torch.logspace(0, -3, shape[-1])
    kw = {"steps": 30, "a": 1.875, "b": -1.25, "c": 0.375} if tol else \
        dict(zip("abc", DEFAULT_COEFFICIENTS), steps=5)
    X, iters, gram = newton_schulz(G, tol=tol, output_gram=True, **kw)
    x = X.double().numpy()
    if x.shape[-2] > x.shape[-1]:
        x = np.swapaxes(x, -1, -2)
    np.testing.assert_allclose(gram.double().numpy(), x @ np.swapaxes(x, -1, -2), atol=2e-5)
    if tol:
        assert len(set(iters.tolist())) > 1


def test_singular_values_exact_when_small_and_bounded_estimates_when_large():
    G = torch.randn(4, 48, 80)
    X = orthogonalize(G).X
    d = ns_diagnostics(X, exact_below=48)  # eigvalsh of the Gram matrix
    ref = np.array([svals(x) for x in X])
    np.testing.assert_allclose(d.sv_min.numpy(), ref.min(1), rtol=1e-4)
    np.testing.assert_allclose(d.sv_max.numpy(), ref.max(1), rtol=1e-4)
    big = orthogonalize(torch.randn(2, 160, 400)).X
    est = ns_diagnostics(big, exact_below=0)  # Lanczos
    ref = np.array([svals(x) for x in big])
    lo, hi = est.sv_min.double().numpy(), est.sv_max.double().numpy()
    # Ritz values lie inside the spectrum, and 16 steps get close to both ends here
    assert np.all(lo >= ref.min(1) - 1e-4) and np.all(hi <= ref.max(1) + 1e-4)
    np.testing.assert_allclose(hi, ref.max(1), rtol=5e-3)
    np.testing.assert_allclose(lo, ref.min(1), rtol=2e-2)


def test_lanczos_against_numpy_eigvalsh_and_after_breakdown():
    rng = np.random.default_rng(5)
    b = rng.standard_normal((3, 200, 400))
    a = b @ b.transpose(0, 2, 1) / 400  # Wishart: spectrum spread over about [0.09, 2.9]
    lo, hi = lanczos_extreme_eigvalsh(torch.from_numpy(a), steps=40)
    ev = np.linalg.eigvalsh(a)
    spread = ev[:, -1] - ev[:, 0]
    assert np.all(lo.numpy() >= ev[:, 0] - 1e-9) and np.all(hi.numpy() <= ev[:, -1] + 1e-9)
    assert np.all(np.abs(hi.numpy() - ev[:, -1]) < 1e-3 * spread)
    assert np.all(np.abs(lo.numpy() - ev[:, 0]) < 1e-2 * spread)
    # rank 2 and zero: the Krylov space runs out after 2 and 0 steps
    v = rng.standard_normal((100, 2))
    low_rank = torch.from_numpy(np.stack([v @ np.diag([3.0, 0.5]) @ v.T, np.zeros((100, 100))]))
    lo, hi = lanczos_extreme_eigvalsh(low_rank, steps=16)
    ev = np.linalg.eigvalsh(low_rank.numpy())
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
    np.testing.assert_allclose(hi.numpy(), ev[:, -1], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(lo.numpy(), [0.0, 0.0], atol=1e-9)


def test_tol_stops_early_and_meets_the_tolerance():
    G = torch.randn(32, 96)
    # default coefficients: the residual oscillates (0.69, 0.29, 0.39, 0.25, 0.41 here),
    # so stopping at an even iteration can beat running all 5
    res = orthogonalize(G, steps=5, tol=0.3)
    assert int(res.iters) == 2
    assert direct_residual(res.X) < 0.3
    assert direct_residual(orthogonalize(G, steps=5).X) > 0.3
    torch.testing.assert_close(res.X, orthogonalize(G, steps=2).X, rtol=0, atol=0)
    # the convergent quintic reaches 1e-3 well before 30 iterations, at the first check
    res = orthogonalize(G, steps=30, coefficients=CONVERGENT, tol=1e-3)
    k = int(res.iters)
    assert k < 30 and k % 2 == 0
    assert direct_residual(res.X) < 1e-3
    assert direct_residual(orthogonalize(G, steps=k - 2, coefficients=CONVERGENT).X) >= 1e-3
    assert int(orthogonalize(G, steps=30, coefficients=CONVERGENT).iters) == 30


def test_batched_equals_unbatched_with_and_without_tol():
    # different conditioning, so with tol the matrices stop at different iterations
    mats = [torch.randn(24, 40), torch.randn(24, 40) * torch.logspace(0, -3, 40),
            torch.randn(40, 24).mT.contiguous(), torch.zeros(24, 40)]
    G = torch.stack(mats)
    for kw in ({}, {"coefficients": CONVERGENT, "steps": 40, "tol": 1e-4}):
        res = orthogonalize(G, **kw)
        singles = [orthogonalize(g, **kw) for g in mats]
        for i, s in enumerate(singles):
            torch.testing.assert_close(res.X[i], s.X, rtol=1e-5, atol=1e-6)
            assert int(res.iters[i]) == int(s.iters)
    assert len({int(i) for i in res.iters}) > 1
    nested = orthogonalize(G.reshape(2, 2, 24, 40)).X.reshape(4, 24, 40)
    torch.testing.assert_close(nested, orthogonalize(G).X, rtol=1e-6, atol=1e-7)


def test_tall_batches_are_transposed_like_single_matrices():
    G = torch.randn(3, 50, 20)
    res = orthogonalize(G)
    for i in range(3):
        torch.testing.assert_close(res.X[i], orthogonalize(G[i]).X, rtol=1e-5, atol=1e-6)
    assert res.X.shape == G.shape


def test_zero_gradient_gives_a_finite_zero_update():
    for G in (torch.zeros(16, 32), torch.zeros(2, 16, 32), torch.zeros(32, 16)):
        res = orthogonalize(G, tol=0.1)
        assert torch.isfinite(res.X).all() and not res.X.any()
        d = ns_diagnostics(res.X)
        assert torch.isfinite(d.residual).all()
        torch.testing.assert_close(d.residual, torch.ones_like(d.residual))
        assert not d.sv_max.any()


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_stays_close():
    G = torch.randn(32, 64)
    assert resolve_ns_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_ns_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    torch.testing.assert_close(orthogonalize(G).X, orthogonalize(G, dtype=torch.float32).X,
                               rtol=0, atol=0)
    low = orthogonalize(G, dtype="bfloat16").X
    assert low.dtype == torch.float32  # returned in G's dtype
    assert (low - orthogonalize(G).X).abs().max() < 0.05
    assert orthogonalize(G.double(), dtype="float64").X.dtype == torch.float64


@pytest.mark.cuda
def test_cuda_auto_is_bfloat16_and_matches_torch_muon_kernel():
    from torch.optim._muon import _zeropower_via_newtonschulz

    G = torch.randn(256, 512, device="cuda")
    ours = orthogonalize(G).X
    ref = _zeropower_via_newtonschulz(G, DEFAULT_COEFFICIENTS, 5, 1e-7).float()
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    batched = orthogonalize(torch.stack([G, G * 2])).X
    torch.testing.assert_close(batched[0], ref, rtol=0.05, atol=0.02)
    d = ns_diagnostics(batched)
    assert torch.isfinite(d.residual).all() and d.residual.device.type == "cuda"


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": 0}, "steps must be an int in \\[1, 100\\]"),
    ({"steps": 101}, "steps"),
    ({"steps": 2.0}, "steps"),
    ({"steps": True}, "steps"),
    ({"coefficients": (1.0, 2.0)}, "coefficients must be three finite floats"),
    ({"coefficients": (1.0, float("nan"), 2.0)}, "coefficients"),
    ({"coefficients": ("a", 1, 2)}, "coefficients"),
    ({"dtype": "int8"}, "dtype must be 'auto' or one of"),
    ({"dtype": torch.int32}, "dtype"),
    ({"tol": 0.0}, "tol must be None or a float in \\(0, inf\\)"),
    ({"tol": -1.0}, "tol"),
    ({"tol": float("nan")}, "tol"),
    ({"tol": "0.1"}, "tol"),
])
def test_invalid_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        orthogonalize(torch.randn(4, 6), **kwargs)


def test_invalid_inputs_raise_value_error():
    with pytest.raises(ValueError, match="G must be a floating tensor"):
        orthogonalize(torch.randn(5))
    with pytest.raises(ValueError, match="G must be a floating tensor"):
        orthogonalize(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="exact_below"):
        ns_diagnostics(torch.randn(3, 4), exact_below=-1)
    with pytest.raises(ValueError, match="lanczos_steps"):
        ns_diagnostics(torch.randn(3, 4), lanczos_steps=1)
    with pytest.raises(ValueError, match="A must be a tensor of square matrices"):
        lanczos_extreme_eigvalsh(torch.randn(3, 4))
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        lanczos_extreme_eigvalsh(torch.eye(3), steps=0)
