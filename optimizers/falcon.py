"""FALCON's gradient filter: keep the high-energy frequency bins of a conv-weight gradient,
make each kept bin's O x I matrix rank-k, transform back and mix with the raw gradient.

Every stage is a pure function of tensors; ``filter_grad`` composes them and, given a bus,
times each stage as a span. Nothing here synchronizes with the device: masks are built with
sort/cumsum/scatter and the low-rank step runs on every bin (a fixed shape) before the mask
zeroes the dropped ones.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch

import hooks
from optimizers.linalg import lowrank_poweriter, lowrank_svd, rank1_poweriter

BACKENDS = ("svd", "poweriter")
# like Muon's ns_steps: more rounds than this buy nothing, and 10**9 would hang every step
MAX_POWERITER_STEPS = 100
STAT_TOPICS = {  # filter statistic -> catalogue topic
    "retained_energy": "falcon/retained_energy",
    "mask_sparsity": "falcon/mask_sparsity",
    "lowrank_residual": "falcon/lowrank_residual",
    "cos_raw_filtered": "falcon/cos_raw_filtered",
}


class FilterResult(NamedTuple):
    """The filtered gradient (shape and dtype of the input), the kept-bin mask (bool,
    ``[kh, kw // 2 + 1]``) and, when asked for, 0-d tensors named as in ``STAT_TOPICS``.
    ``svd_failed``: the svd backend raised and power iteration stood in; ``stats_error``:
    the statistics raised (they are NaN then; the gradient is unaffected)."""

    grad: torch.Tensor
    mask: torch.Tensor
    stats: dict[str, torch.Tensor] | None
    svd_failed: bool = False
    stats_error: Exception | None = None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    """A finite int or float (not a bool; not an int past float64, where isfinite raises)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def check_retain_energy(value: object, name: str = "retain_energy") -> None:
    """Raise ValueError unless ``value`` is a number in (0, 1]."""
    if not (_is_real(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


def check_skip_mix(value: object, name: str = "skip_mix") -> None:
    """Raise ValueError unless ``value`` is a number in [0, 1]."""
    if not (_is_real(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def check_lowrank(rank_k: object, backend: object, poweriter_steps: object) -> None:
    """Raise ValueError unless rank_k >= 1, backend is known and poweriter_steps is in
    [1, MAX_POWERITER_STEPS]."""
    if not (_is_int(rank_k) and rank_k >= 1):
        raise ValueError(f"rank_k must be an int >= 1, got {rank_k!r}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, "
                         f"got {backend!r}")
    if not (_is_int(poweriter_steps) and 1 <= poweriter_steps <= MAX_POWERITER_STEPS):
        raise ValueError(f"poweriter_steps must be an int >= 1 and <= {MAX_POWERITER_STEPS} "
                         f"(each is a round of matmuls in every step), got "
                         f"{poweriter_steps!r}")


def mask_shape(kernel: tuple[int, int]) -> tuple[int, int]:
    """Shape of the rfft2 bin grid (and of the mask) for a ``(kh, kw)`` kernel."""
    return kernel[0], kernel[1] // 2 + 1


# Kernels with at most this many taps take the DFT as one small matmul: for 3x3 or 5x5
# kernels that is several times faster than torch.fft on O*I tiny transforms.
MATMUL_DFT_MAX_TAPS = 64
_DFT: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _dft_matrices(kernel: tuple[int, int], dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """rfft2 and irfft2 of a ``kernel``-sized grid as real matrices, found by transforming
    basis vectors (so they are rfft2/irfft2 exactly, c2r conventions included):
    forward [taps, bins * 2] (re/im interleaved) and inverse [bins, 2, taps]."""
    key = (kernel, dtype, device)
    mats = _DFT.get(key)
    if mats is None:
        kh, kw = kernel
        taps, (_, kwr) = kh * kw, mask_shape(kernel)
        eye = torch.eye(taps, dtype=torch.float64).reshape(taps, kh, kw)
        fwd = torch.view_as_real(torch.fft.rfft2(eye)).reshape(taps, -1)
        unit = torch.zeros(kh * kwr, 2, kh * kwr, dtype=torch.complex128)
        idx = torch.arange(kh * kwr)
        unit[idx, 0, idx] = 1.0
        unit[idx, 1, idx] = 1.0j
        inv = torch.fft.irfft2(unit.reshape(-1, kh, kwr), s=kernel).reshape(kh * kwr, 2, taps)
        mats = _DFT[key] = (fwd.to(dtype=dtype, device=device),
                            inv.to(dtype=dtype, device=device))
    return mats


def _work_dtype(g: torch.Tensor) -> torch.dtype:
    # rfft has no bf16 kernel and fp16 only for power-of-two sizes: half types run in fp32
    return torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype


def spectrum(g: torch.Tensor) -> torch.Tensor:
    """rfft2 of ``g`` [O, I, kh, kw] over the kernel dims with the bins flattened last:
    ``[O, I, bins]`` complex, bin ``b`` being entry ``b`` of the row-major
    ``[kh, kw // 2 + 1]`` grid (the layout both transforms produce without a copy)."""
    o, i, kh, kw = g.shape
    x = g.to(_work_dtype(g))
    if kh * kw <= MATMUL_DFT_MAX_TAPS:
        fwd, _ = _dft_matrices((kh, kw), x.dtype, x.device)
        return torch.view_as_complex((x.reshape(o * i, kh * kw) @ fwd).view(o, i, -1, 2))
    return torch.fft.rfft2(x).reshape(o, i, -1)


def inverse(bins: torch.Tensor, mask: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """irfft2 of the ``[O, I, bins]`` spectrum with the bins outside ``mask`` zeroed:
    a real ``[O, I, kh, kw]`` tensor."""
    o, i, nb = bins.shape
    keep = mask.reshape(nb)
    if kernel[0] * kernel[1] <= MATMUL_DFT_MAX_TAPS:
        _, inv = _dft_matrices(kernel, bins.real.dtype, bins.device)
        inv = inv * keep[:, None, None]  # zeroing a bin = dropping its rows of the map
        x = torch.view_as_real(bins).reshape(o * i, nb * 2)
        return (x @ inv.reshape(nb * 2, -1)).view(o, i, *kernel)
    return torch.fft.irfft2((bins * keep).reshape(o, i, kernel[0], -1), s=kernel)


def bin_energy(bins: torch.Tensor) -> torch.Tensor:
    """Per-bin energy ``sum over O, I of |F|^2`` of an ``[O, I, bins]`` spectrum: ``[bins]``."""
    return torch.view_as_real(bins).square().sum(dim=(0, 1, 3))


def energy_mask(energy: torch.Tensor, retain: float, fast: bool = False) -> torch.Tensor:
    """Bool mask (shape of ``energy``) of the fewest highest-energy bins holding ``retain`` of
    the total (sort + cumulative sum), or with ``fast`` the top ``ceil(retain * bins)`` bins by
    count. A zero or non-finite total keeps every bin: there is nothing to rank them by."""
    flat = energy.reshape(-1)
    n = flat.numel()
    if fast:
        # the small offset keeps 0.6 * 15 = 9.000000000000002 from rounding up to 10
        keep = min(n, max(1, math.ceil(retain * n - 1e-9)))
        mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
        return mask.scatter_(0, flat.topk(keep).indices, True).reshape(energy.shape)
    # the cut is a threshold on a running sum: take it in float64
    vals, order = torch.sort(flat.double(), descending=True)
    csum = vals.cumsum(0)
    total = csum[-1:]
    count = torch.searchsorted(csum, total * retain) + 1  # the bin reaching the target is kept
    count = torch.where(total > 0, count, n)
    keep = torch.arange(n, device=flat.device) < count
    mask = torch.empty(n, dtype=torch.bool, device=flat.device).scatter_(0, order, keep)
    return mask.reshape(energy.shape)


def lowrank_bins(bins: torch.Tensor, rank_k: int, backend: str = "poweriter",
                 poweriter_steps: int = 1) -> tuple[torch.Tensor, bool]:
    """Each bin's O x I matrix of ``bins`` [O, I, bins] replaced by its rank-k approximation,
    and whether the svd backend failed (LAPACK does not converge on a NaN/Inf spectrum) so
    that ``poweriter_steps`` rounds of power iteration stood in."""
    if rank_k >= min(bins.shape[:2]):
        return bins, False
    # the normalizations and QR of power iteration underflow to NaN on a denormal spectrum
    # (a float32 gradient near 1e-39) and both backends overflow on a huge one: work on the
    # spectrum scaled by powers of 2 that bring its largest entry near 1, exact both ways
    lo, hi = _power_of_2_scales(bins)
    low, failed = _lowrank(bins * lo * hi, rank_k, backend, poweriter_steps)
    return low / hi / lo, failed


def _lowrank(bins: torch.Tensor, rank_k: int, backend: str, poweriter_steps: int
             ) -> tuple[torch.Tensor, bool]:
    """``lowrank_bins`` of a spectrum already scaled to a largest entry near 1."""
    if rank_k >= min(bins.shape[:2]):
        return bins, False
    if backend == "poweriter" and rank_k == 1:  # no transpose copies, no QR
        return rank1_poweriter(bins, poweriter_steps), False
    stacked = bins.permute(2, 0, 1)  # the batched helpers want the matrices last
    if backend == "svd":
        try:
            return lowrank_svd(stacked, rank_k).permute(1, 2, 0), False
        except RuntimeError:  # torch.linalg.LinAlgError
            pass
    low = lowrank_poweriter(stacked, rank_k, poweriter_steps)
    return low.permute(1, 2, 0), backend == "svd"


def _power_of_2_scales(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 0-d powers of 2 (x's real dtype) whose product s makes ``max|x| * s`` lie in
    [1/2, 1); two, because s alone can exceed the dtype's range for a denormal ``x``. Both
    are 1 for a zero or non-finite ``x``. No host sync."""
    amax = x.abs().amax() if x.numel() else torch.zeros((), dtype=x.real.dtype,
                                                          device=x.device)
    e = torch.frexp(amax).exponent  # amax = m * 2**e, m in [0.5, 1)
    ok = torch.isfinite(amax) & (amax > 0)
    one = torch.ones_like(amax)
    half = torch.div(-e, 2, rounding_mode="floor")
    lo = torch.where(ok, torch.ldexp(one, half), one)
    hi = torch.where(ok, torch.ldexp(one, -e - half), one)
    return lo, hi


def _filter(g: torch.Tensor, retain: float, rank_k: int, backend: str, poweriter_steps: int,
            skip_mix: float, mask: torch.Tensor | None, fast_mask: bool, stats: bool,
            bus: hooks.Bus | None, tags: dict) -> FilterResult:
    """``filter_grad`` without argument checks, for the optimizer's hot path."""
    if bus is None:
        def span(name):
            return nullcontext()
    else:
        def span(name):
            return bus.span(name, device=g.device, **tags)

    kernel = (g.shape[-2], g.shape[-1])
    # every stage works on the gradient scaled by powers of 2 that bring its largest entry
    # near 1 (exact both ways): a denormal gradient would underflow power iteration's
    # normalizations to NaN, a huge one (entries past max/taps) overflow the transform, the
    # energies and LAPACK's svd; the masks and statistics are ratios, unchanged by scaling
    x = g.to(_work_dtype(g))
    lo, hi = _power_of_2_scales(x)
    x = x * lo * hi
    with span("falcon/fft"):
        f = spectrum(x)
    energy = None
    if mask is None or stats:
        with span("falcon/mask"):
            energy = bin_energy(f).reshape(mask_shape(kernel))
            if mask is None:
                mask = energy_mask(energy, retain, fast_mask)
    with span("falcon/lowrank"):
        low, svd_failed = _lowrank(f, rank_k, backend, poweriter_steps)
    with span("falcon/ifft"):
        scaled = inverse(low, mask, kernel)
        out = (scaled / hi / lo).to(g.dtype)
        if skip_mix > 0.0:
            out = torch.lerp(out, g, skip_mix)
    result_stats, error = None, None
    if stats:
        try:
            if skip_mix > 0.0:  # the mixed gradient, at the same scale as x
                scaled = out.to(x.dtype) * lo * hi
            result_stats = _stats(x, f, low, scaled, energy, mask)
        except Exception as exc:  # telemetry never costs the gradient
            error = exc
            nan = torch.full((), math.nan, device=g.device)
            result_stats = dict.fromkeys(STAT_TOPICS, nan)
    return FilterResult(out, mask, result_stats, svd_failed, error)


def _stats(g: torch.Tensor, f: torch.Tensor, low: torch.Tensor, out: torch.Tensor,
           energy: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The filter's statistics as 0-d tensors (NaN where the gradient was not finite)."""
    keep = mask.reshape(-1)
    total = energy.sum()
    kept_energy = (energy.reshape(-1) * keep).sum()
    tiny = torch.finfo(total.dtype).tiny
    if low is f:
        residual = torch.zeros((), dtype=total.dtype, device=total.device)
    else:
        lost = (bin_energy(f - low) * keep).sum()
        residual = lost / kept_energy.clamp_min(tiny)
    retained = torch.where(total > 0, kept_energy / total.clamp_min(tiny), 1.0)
    return {
        # NaN > 0 is False: a NaN spectrum would read "all energy kept" without the isnan
        "retained_energy": torch.where(torch.isnan(total), total, retained),
        "mask_sparsity": 1.0 - keep.float().mean(),
        "lowrank_residual": residual,
        "cos_raw_filtered": torch.nn.functional.cosine_similarity(
            g.reshape(1, -1).float(), out.reshape(1, -1).float(), eps=1e-30)[0],
    }


def filter_grad(g: torch.Tensor, retain_energy: float = 0.9, *, rank_k: int = 1,
                backend: str = "poweriter", poweriter_steps: int = 1, skip_mix: float = 0.0,
                mask: torch.Tensor | None = None, fast_mask: bool = False, stats: bool = False,
                bus: hooks.Bus | None = None, tags: dict | None = None) -> FilterResult:
    """Filter a conv-weight gradient ``g`` [O, I, kh, kw] in the frequency domain.

    Keeps the bins holding ``retain_energy`` of the spectral energy (or reuses ``mask``),
    makes each kept bin rank ``rank_k`` ("svd" exact, "poweriter" approximate), zeroes the
    rest, transforms back and returns ``(1 - skip_mix) * filtered + skip_mix * g``. With
    ``stats`` the result carries retained energy, mask sparsity, low-rank residual and
    cosine(raw, filtered) as 0-d tensors; with ``bus`` each stage is a ``falcon/*`` span.
    """
    if not isinstance(g, torch.Tensor) or g.ndim != 4 or not g.is_floating_point():
        raise ValueError(f"g must be a floating-point tensor of shape [O, I, kh, kw], got "
                         f"{type(g).__name__ if not isinstance(g, torch.Tensor) else g.shape}")
    if g.numel() == 0:
        raise ValueError(f"g must have no zero-sized dimension, got shape {tuple(g.shape)}")
    check_retain_energy(retain_energy)
    check_lowrank(rank_k, backend, poweriter_steps)
    check_skip_mix(skip_mix)
    if not isinstance(fast_mask, bool):
        raise ValueError(f"fast_mask must be True or False, got {fast_mask!r}")
    if mask is not None:
        want = mask_shape(tuple(g.shape[-2:]))
        if (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                or tuple(mask.shape) != want or mask.device != g.device):
            raise ValueError(f"mask must be a bool tensor of shape {want} on {g.device}, got "
                             f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask)}"
                             f" {tuple(getattr(mask, 'shape', ()))}")
    if bus is not None and not isinstance(bus, hooks.Bus):
        raise ValueError(f"bus must be a hooks.Bus or None, got {type(bus).__name__}")
    return _filter(g, float(retain_energy), rank_k, backend, poweriter_steps, float(skip_mix),
                   mask, fast_mask, stats, bus, dict(tags or {}))
