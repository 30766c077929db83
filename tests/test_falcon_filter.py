"""FALCON's filter and the low-rank helpers against numpy/scipy references written from the
definition: scipy.fft rfft2, an exact sort + cumsum mask, scipy.linalg.svd per kept bin."""

import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import torch

import hooks
import optimizers.falcon as falcon
from optimizers.falcon import filter_grad, mask_shape
from optimizers.linalg import lowrank_poweriter, lowrank_svd, rank1_poweriter
from tests.helpers import Recorder


# -- references ----------------------------------------------------------------------------
def ref_mask(g: np.ndarray, retain: float, fast: bool = False) -> np.ndarray:
    """Kept bins of g by the definition: fewest top-energy bins reaching ``retain``."""
    energy = (np.abs(scipy.fft.rfft2(g, axes=(-2, -1))) ** 2).sum(axis=(0, 1))
    flat = energy.ravel()
    order = np.argsort(-flat, kind="stable")
    if fast:
        count = max(1, int(np.ceil(round(retain * flat.size, 9))))
    else:
        csum = np.cumsum(flat[order])
        count = int(np.searchsorted(csum, retain * csum[-1], side="left")) + 1
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[:count]] = True
    return keep.reshape(energy.shape)


def ref_filter(g: np.ndarray, mask: np.ndarray, k: int, lam: float) -> np.ndarray:
    """rfft2 -> rank-k (scipy SVD) on kept bins, zero elsewhere -> irfft2 -> skip-mix."""
    f = scipy.fft.rfft2(g, axes=(-2, -1))
    out = np.zeros_like(f)
    for r, c in zip(*np.nonzero(mask)):
        u, s, vh = scipy.linalg.svd(f[:, :, r, c], full_matrices=False)
        out[:, :, r, c] = (u[:, :k] * s[:k]) @ vh[:k]
    filtered = scipy.fft.irfft2(out, s=g.shape[-2:], axes=(-2, -1))
    return (1 - lam) * filtered + lam * g


def smooth_grad(shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    """A conv-like gradient: noise times a spatial envelope, so energy sits in low bins."""
    gen = torch.Generator().manual_seed(seed)
    o, i, kh, kw = shape
    env = torch.outer(torch.hann_window(kh + 2, periodic=False, dtype=dtype)[1:-1],
                      torch.hann_window(kw + 2, periodic=False, dtype=dtype)[1:-1])
    base = torch.randn(o, i, 1, 1, generator=gen, dtype=dtype) * env
    return base + 0.3 * torch.randn(shape, generator=gen, dtype=dtype)


def partner_classes(mask: np.ndarray, kw: int) -> dict:
    """Kept bins counted per conjugate class: in the columns rfft2 keeps whole (0 and, for
    even kw, kw/2) bins r and -r carry the same energy, so either may win a tie."""
    kh = mask.shape[0]
    counts: dict = {}
    for r, c in zip(*np.nonzero(mask)):
        whole = c == 0 or (kw % 2 == 0 and c == kw // 2)
        key = (min(r, (-r) % kh), c) if whole else (r, c)
        counts[key] = counts.get(key, 0) + 1
    return counts


SHAPES = [(6, 4, 3, 3), (5, 7, 5, 4), (3, 8, 7, 7), (4, 3, 9, 10)]


@pytest.fixture(params=["matmul", "fft"])
def dft_path(request, monkeypatch):
    """Both ways of taking the transform: the small-kernel matmul DFT and torch.fft."""
    if request.param == "fft":
        monkeypatch.setattr(falcon, "MATMUL_DFT_MAX_TAPS", 0)
    return request.param


# -- the filter ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("retain,k,lam", [(0.5, 1, 0.0), (0.8, 2, 0.3), (0.95, 1, 0.7)])
def test_filter_matches_numpy_reference(dft_path, shape, retain, k, lam):
    g = smooth_grad(shape, seed=sum(shape))
    res = filter_grad(g, retain, rank_k=k, backend="svd", skip_mix=lam)
    mask = ref_mask(g.numpy(), retain)
    assert res.mask.dtype == torch.bool and tuple(res.mask.shape) == mask_shape(shape[2:])
    assert partner_classes(res.mask.numpy(), shape[3]) == partner_classes(mask, shape[3])
    assert 0 < res.mask.sum() < res.mask.numel()  # the case really filters something
    want = ref_filter(g.numpy(), mask, k, lam)
    np.testing.assert_allclose(res.grad.numpy(), want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("retain", [0.3, 0.6, 0.9])
def test_fast_mask_is_top_fraction_by_count(shape, retain):
    g = smooth_grad(shape, seed=7)
    res = filter_grad(g, retain, fast_mask=True, rank_k=min(shape[:2]))
    want = ref_mask(g.numpy(), retain, fast=True)
    assert res.mask.sum().item() == want.sum()
    assert partner_classes(res.mask.numpy(), shape[3]) == partner_classes(want, shape[3])


@pytest.mark.parametrize("seed", range(12))
def test_exact_mask_retains_target_with_fewest_bins(seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (int(torch.randint(1, 9, (1,), generator=gen)), 5,
             int(torch.randint(2, 8, (1,), generator=gen)),
             int(torch.randint(2, 8, (1,), generator=gen)))
    retain = float(torch.rand((), generator=gen, dtype=torch.float64)) * 0.98 + 0.02
    g = smooth_grad(shape, seed)
    res = filter_grad(g, retain, stats=True)
    energy = (np.abs(scipy.fft.rfft2(g.numpy(), axes=(-2, -1))) ** 2).sum(axis=(0, 1))
    keep = res.mask.numpy()
    kept = energy[keep].sum() / energy.sum()
    assert kept >= retain * (1 - 1e-12)
    assert kept - energy[keep].min() / energy.sum() < retain  # one bin fewer would not do
    assert res.stats["retained_energy"].item() == pytest.approx(kept, rel=1e-12)
    assert res.stats["mask_sparsity"].item() == pytest.approx(1 - keep.mean(), abs=1e-7)


@pytest.mark.parametrize("backend", ["svd", "poweriter"])
@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (3, 5, 4, 6)])
def test_full_rank_and_full_energy_is_identity(dft_path, backend, shape):
    g = torch.randn(shape)
    res = filter_grad(g, 1.0, rank_k=min(shape[:2]), backend=backend, stats=True)
    torch.testing.assert_close(res.grad, g, rtol=1e-5, atol=1e-6)
    assert res.stats["lowrank_residual"].item() == 0.0
    assert res.stats["cos_raw_filtered"].item() == pytest.approx(1.0, abs=1e-6)


def test_skip_mix_one_returns_raw_gradient():
    g = torch.randn(8, 6, 3, 3)
    res = filter_grad(g, 0.5, rank_k=1, skip_mix=1.0)
    assert torch.equal(res.grad, g)
    assert res.mask.sum() < res.mask.numel()


def test_cached_mask_is_reused(dft_path):
    g1, g2 = smooth_grad((6, 5, 5, 5), 1), torch.randn(6, 5, 5, 5, dtype=torch.float64)
    first = filter_grad(g1, 0.6, backend="svd")
    again = filter_grad(g2, 0.99, backend="svd", mask=first.mask)
    assert again.mask is first.mask
    assert not np.array_equal(ref_mask(g2.numpy(), 0.99), first.mask.numpy())
    want = ref_filter(g2.numpy(), first.mask.numpy(), 1, 0.0)
    np.testing.assert_allclose(again.grad.numpy(), want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", ["svd", "poweriter"])
@pytest.mark.parametrize("fast", [False, True])
def test_zero_gradient_stays_finite(backend, fast):
    g = torch.zeros(4, 3, 3, 3)
    res = filter_grad(g, 0.9, rank_k=1, backend=backend, fast_mask=fast, stats=True,
                      skip_mix=0.2)
    assert torch.equal(res.grad, g)
    assert all(torch.isfinite(v) for v in res.stats.values())
    assert res.stats["retained_energy"].item() == 1.0


def test_poweriter_matches_svd_on_separated_bins(dft_path):
    # a rank-1 signal with a flat spectrum in every bin plus small noise: well separated
    gen = torch.Generator().manual_seed(3)
    u, v = torch.randn(12, generator=gen), torch.randn(10, generator=gen)
    g = 5.0 * torch.einsum("o,i->oi", u, v)[:, :, None, None] * torch.randn(
        1, 1, 3, 3, generator=gen) + 0.05 * torch.randn(12, 10, 3, 3, generator=gen)
    mask = filter_grad(g, 0.9).mask
    exact = filter_grad(g, 0.9, backend="svd", mask=mask).grad
    for steps, tol in ((1, 1e-2), (3, 1e-5)):
        approx = filter_grad(g, 0.9, backend="poweriter", poweriter_steps=steps,
                             mask=mask).grad
        assert (approx - exact).norm() / exact.norm() < tol, steps


def test_half_precision_gradient_keeps_its_dtype():
    g = torch.randn(6, 4, 3, 3)
    res = filter_grad(g.bfloat16(), 0.8, stats=True)
    ref = filter_grad(g.bfloat16().float(), 0.8)
    assert res.grad.dtype == torch.bfloat16
    torch.testing.assert_close(res.grad.float(), ref.grad, rtol=2e-2, atol=2e-2)


def test_spans_and_stats_on_the_bus():
    bus = hooks.Bus(strict=True)
    rec = Recorder()
    bus.subscribe(rec, "time/falcon/*")
    bus.begin_step(0)
    res = filter_grad(torch.randn(4, 4, 3, 3), 0.8, stats=True, bus=bus, tags={"param": "w"})
    bus.end_step()
    assert set(res.stats) == set(falcon.STAT_TOPICS)
    assert sorted(e.topic for e in rec.events) == [
        "time/falcon/fft", "time/falcon/ifft", "time/falcon/lowrank", "time/falcon/mask"]
    assert all(e.tags == {"param": "w"} and e.value >= 0 for e in rec.events)


@pytest.mark.parametrize("kwargs,match", [
    ({"retain_energy": 0.0}, r"retain_energy must be a number in \(0, 1\]"),
    ({"retain_energy": 1.01}, "retain_energy"),
    ({"retain_energy": float("nan")}, "retain_energy"),
    ({"rank_k": 0}, "rank_k must be an int >= 1"),
    ({"rank_k": 1.0}, "rank_k"),
    ({"backend": "qr"}, "backend must be one of 'svd', 'poweriter'"),
    ({"poweriter_steps": 0}, "poweriter_steps"),
    ({"skip_mix": -0.1}, r"skip_mix must be a number in \[0, 1\]"),
    ({"fast_mask": 1}, "fast_mask"),
    ({"mask": torch.ones(3, 3, dtype=torch.bool)}, r"mask must be a bool tensor of shape \(3, 2\)"),
    ({"mask": torch.ones(3, 2)}, "mask must be a bool tensor"),
    ({"g": torch.randn(4, 4, 3)}, r"g must be a floating-point tensor of shape \[O, I, kh, kw\]"),
    ({"g": torch.ones(4, 4, 3, 3, dtype=torch.long)}, "g must be a floating-point"),
])
def test_bad_arguments_raise(kwargs, match):
    args = {"g": torch.randn(4, 4, 3, 3), "retain_energy": 0.9, **kwargs}
    with pytest.raises(ValueError, match=match):
        filter_grad(args.pop("g"), args.pop("retain_energy"), **args)


# -- the low-rank helpers ------------------------------------------------------------------
def separated(batch, m, n, sv, dtype, seed):
    """Matrices with the given singular values and random complex/real singular vectors."""
    gen = torch.Generator().manual_seed(seed)

    def orth(rows, cols):
        x = torch.randn(batch, rows, cols, generator=gen, dtype=torch.float64)
        if dtype.is_complex:
            x = torch.complex(x, torch.randn(batch, rows, cols, generator=gen,
                                             dtype=torch.float64))
        return torch.linalg.qr(x).Q

    r = len(sv)
    s = torch.tensor(sv, dtype=torch.float64)
    return ((orth(m, r) * s.to(orth(1, 1).dtype)) @ orth(n, r).mH).to(dtype)


def scipy_truncated(a: torch.Tensor, k: int) -> np.ndarray:
    out = []
    for mat in a.numpy():
        u, s, vh = scipy.linalg.svd(mat, full_matrices=False)
        out.append((u[:, :k] * s[:k]) @ vh[:k])
    return np.stack(out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_lowrank_svd_matches_scipy(dtype, k):
    a = separated(4, 7, 5, [9.0, 4.0, 2.0, 1.0, 0.5], dtype, seed=k)
    np.testing.assert_allclose(lowrank_svd(a, k).numpy(), scipy_truncated(a, k), atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("k,sv", [(1, [10.0, 1.0, 0.5, 0.2]), (2, [10.0, 8.0, 1.0, 0.3])])
def test_poweriter_converges_to_svd(dtype, k, sv):
    a = separated(6, 9, 8, sv, dtype, seed=k)
    want = scipy_truncated(a, k)
    err = [np.abs(lowrank_poweriter(a, k, steps).numpy() - want).max() / np.abs(want).max()
           for steps in (1, 2, 4)]
    assert err[0] < 5e-2 and err[2] < 1e-7
    assert err[2] < err[1] < err[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_rank1_poweriter_batch_last_converges_to_svd(dtype):
    a = separated(5, 7, 9, [10.0, 1.0, 0.5, 0.2], dtype, seed=11)
    want = scipy_truncated(a, 1)
    last = a.permute(1, 2, 0)  # the filter's layout: matrices stacked along the last dim
    err = [np.abs(rank1_poweriter(last, steps).permute(2, 0, 1).numpy() - want).max()
           / np.abs(want).max() for steps in (1, 2, 4)]
    assert err[0] < 5e-2 and err[2] < 1e-7
    assert err[2] < err[1] < err[0]
    generic = lowrank_poweriter(a, 1, 2).permute(1, 2, 0)
    torch.testing.assert_close(rank1_poweriter(last, 2), generic, rtol=1e-10, atol=1e-12)


def test_lowrank_edge_cases():
    a = torch.randn(3, 4, 6, dtype=torch.complex64)
    assert torch.equal(lowrank_poweriter(a, 4), a) and torch.equal(lowrank_svd(a, 5), a)
    assert torch.equal(lowrank_poweriter(torch.zeros(2, 5, 5), 2), torch.zeros(2, 5, 5))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            lowrank_svd(a, bad)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        lowrank_poweriter(a, 1, steps=0)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        lowrank_svd(torch.randn(5), 1)
    assert torch.equal(rank1_poweriter(torch.zeros(4, 3, 2), 1), torch.zeros(4, 3, 2))
    with pytest.raises(ValueError, match=r"shape \[m, n, batch\]"):
        rank1_poweriter(torch.randn(4, 3), 1)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        rank1_poweriter(torch.randn(4, 3, 2), 0)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("scale", [1e-38, 1e-39, 1e30])
def test_poweriter_filter_of_a_tiny_or_huge_float32_gradient_is_finite_and_scales(k, scale):
    # before: the float32 normalizations in power iteration underflowed to NaN near 1e-39
    g = smooth_grad((6, 5, 5, 5), seed=3, dtype=torch.float64)
    mask = torch.from_numpy(ref_mask(g.numpy(), 0.9))
    small = (g * scale).float()
    g = small.double() / scale  # the values the float32 gradient holds, at unit scale
    got = filter_grad(small, mask=mask, rank_k=k, backend="poweriter", poweriter_steps=8).grad
    assert torch.isfinite(got).all()
    # the filter commutes with scaling: the same result as at unit scale, scaled
    unit = filter_grad(g.float(), mask=mask, rank_k=k, backend="poweriter",
                       poweriter_steps=8).grad.double()
    err = (got.double() / scale - unit).abs().max() / unit.abs().max()
    assert err < (1e-4 if scale < 1e-38 else 1e-5), err
