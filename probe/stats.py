"""Generic optimizer-step statistics, computed on device in a few fused kernels.

On a small model every torch call costs more than the arithmetic it does (each one meets a
cold cache after the forward and backward passes), so these functions count their calls:
norms come from one ``_foreach_norm`` per list, the update is formed in place in
the snapshot, and all per-parameter numbers leave in one stacked tensor.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

_TINY = 1e-30
_F32 = torch.float32
STAT_ROWS = ("grad/norm", "param/norm", "update/norm", "update/ratio", "update/cos_grad")
_foreach_clone = getattr(torch, "_foreach_clone", None)  # absent from older torch releases
_HALF = frozenset((torch.float16, torch.bfloat16))


def entries(t: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """The real numbers a gradient or parameter holds, as a dense real tensor: a sparse
    tensor's stored values (coalesced when ``exact``, so repeated indices add up as they do in
    the tensor; uncoalesced is enough to find a NaN), a complex tensor's real and imaginary
    parts; any other tensor itself."""
    if t.layout is not torch.strided:
        t = (t.coalesce() if exact else t)._values()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t


def _plain(ts: list[torch.Tensor], exact: bool = True) -> tuple[list[torch.Tensor], set]:
    """(``ts`` as real dense tensors, see :func:`entries`; the set of their dtypes), in one
    pass over the list when nothing needs converting: this runs on every step."""
    kinds = {(t.dtype, t.layout) for t in ts}
    if all(layout is torch.strided and not dtype.is_complex for dtype, layout in kinds):
        return ts, {dtype for dtype, _ in kinds}
    ts = [entries(t, exact) for t in ts]
    return ts, {t.dtype for t in ts}


def abs_sums(grads: list[torch.Tensor]) -> torch.Tensor:
    """sum |g| of each gradient, stacked: non-finite where a NaN or Inf is present.

    The L1 norm is used rather than max-abs (3x slower on CPU, and undefined on a 0-size
    tensor) or L2 (squares overflow fp32 from |g| ~ 1e19). Half-precision gradients are summed
    into float32: in their own dtype a finite float16 gradient overflows from a sum of 65504
    (a few hundred entries of 1e3, common under loss scaling). A float32/float64/bfloat16 sum
    still overflows for entries near the dtype's largest value; ``FiniteCheck.mask`` re-checks
    the gradients this flags, so only these sums' readers on CUDA can see such a false alarm.
    """
    grads, dtypes = _plain(grads, exact=False)
    if _HALF.isdisjoint(dtypes):
        return torch.stack(torch._foreach_norm(grads, 1))
    half = [i for i, g in enumerate(grads) if g.dtype in _HALF]
    full = [i for i, g in enumerate(grads) if g.dtype not in _HALF]
    out: list[torch.Tensor | None] = [None] * len(grads)
    for i, v in zip(half, torch._foreach_norm([grads[i] for i in half], 1, dtype=_F32)):
        out[i] = v
    if full:
        for i, v in zip(full, torch._foreach_norm([grads[i] for i in full], 1)):
            out[i] = v
    return torch.stack(out)


class FiniteCheck:
    """Which gradients hold a NaN or Inf, read on the host (a sync on CUDA).

    The common, clean case costs one fused pass (torch's AMP finiteness check) whose flag
    tensors are kept between calls: allocating them each step cost as much as the pass.
    Only when it fires are the per-gradient norms computed to name the culprits.
    """

    def __init__(self) -> None:
        self._flags: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def mask(self, grads: list[torch.Tensor], sums: torch.Tensor | None = None) -> list[bool]:
        """One bool per gradient: True where it holds a NaN or Inf (exactly: a finite
        gradient whose sum overflows is not named). ``sums``: a 1-d tensor, per gradient a
        number that is non-finite where it holds a NaN or Inf (its norm, from
        :func:`step_norms`), which spares the check a pass."""
        if sums is not None:
            sums = sums.tolist()
            if all(map(math.isfinite, sums)):
                return [False] * len(grads)
        elif self.all_finite(grads):
            return [False] * len(grads)
        else:
            sums = abs_sums(grads).tolist()
        # an infinite sum of finite entries (near the dtype's largest value): look again
        return [not math.isfinite(v) and not bool(torch.isfinite(entries(g, False)).all())
                for v, g in zip(sums, grads)]

    def all_finite(self, grads: list[torch.Tensor]) -> bool:
        """True when every gradient is finite; gradients are left bit-identical. False may
        also mean a finite bfloat16 gradient whose sum overflows float32 (``mask`` is exact)."""
        dev = grads[0].device
        flags = self._flags.get(dev)
        if flags is None:
            flags = self._flags[dev] = (torch.zeros(1, device=dev), torch.ones(1, device=dev))
        found, one = flags
        # the AMP check multiplies by inv_scale = 1.0 in place, which leaves float32 and
        # float64 values (NaN, -0.0, subnormals) bit-identical; it only ever sets `found`, so
        # a clean pass needs no reset. It would rewrite a float16/bfloat16 NaN as the
        # canonical NaN (its float round trip drops sign and payload), so half-precision
        # gradients are checked by their float32 sums instead. Gradients it does not take
        # (sparse, mixed devices) go the slow way.
        grads, dtypes = _plain(grads, exact=False)
        try:
            if _HALF.isdisjoint(dtypes):
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
            else:
                full = [g for g in grads if g.dtype not in _HALF]
                if full:
                    torch._amp_foreach_non_finite_check_and_unscale_(full, found, one)
                half = torch.stack(torch._foreach_norm([g for g in grads if g.dtype in _HALF],
                                                       1, dtype=_F32))
                found.add_((~torch.isfinite(half)).any().to(found.device))
        except (RuntimeError, TypeError, NotImplementedError):
            return False
        if not found.item():
            return True
        found.zero_()
        return False


def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies of ``params`` (one fused call where torch has it), taken before the step."""
    with torch.no_grad():
        if _foreach_clone is not None and all(p.layout is torch.strided for p in params):
            return _foreach_clone(params)
        return [p.clone() for p in params]


def step_norms(before: list[torch.Tensor], after: list[torch.Tensor],
               grads: list[torch.Tensor]) -> torch.Tensor:
    """A (4, P) tensor, rows |g|, |before|, |update| and <-update, g> per parameter (float32;
    float64 when a parameter is), in one read of each list after the step.

    ``before`` (a :func:`snapshot`) is consumed: it holds ``before - after``, the negated
    update, afterwards (a small tensor's may be left as it was). |g| is
    non-finite wherever a gradient holds a NaN or Inf, so it doubles as the step's finiteness
    check (:meth:`FiniteCheck.mask`).
    """
    with torch.no_grad():
        kinds = {(t.dtype, t.layout) for ts in (before, after, grads) for t in ts}
        small = _small(before, after, grads, kinds)
        if not small:
            return _grouped_norms(before, after, grads)
        taken = set(small)
        rest = [i for i in range(len(before)) if i not in taken]
        parts = [(small, _batched_norms([before[i] for i in small], [after[i] for i in small],
                                        [grads[i] for i in small]))]
        if rest:
            parts.append((rest, _grouped_norms([before[i] for i in rest],
                                               [after[i] for i in rest],
                                               [grads[i] for i in rest])))
        wide = any(dtype == torch.float64 for dtype, _ in kinds)
        out = torch.empty(4, len(before), dtype=torch.float64 if wide else _F32,
                          device=parts[0][1].device)
        for cols, n in parts:
            out[:, _index(tuple(cols), out.device)] = n.to(out.dtype)
        return out


@functools.lru_cache(maxsize=32)
def _index(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``values`` as an index tensor on ``device``, made once per parameter list: a list
    copied to a GPU each sampled step would wait for the stream (a pageable copy syncs)."""
    return torch.tensor(values, device=device)


_SMALL = 1 << 12  # values: a smaller tensor's five calls cost more than its data


def _small(before: list[torch.Tensor], after: list[torch.Tensor], grads: list[torch.Tensor],
           kinds: set) -> list[int]:
    """Positions of the dense real tensors of at most ``_SMALL`` values, when there are enough
    of them (biases, norms' scales) for one batched pass to beat their per-tensor calls;
    ``kinds``: the lists' (dtype, layout) pairs."""
    if all(layout is torch.strided and dtype.is_floating_point for dtype, layout in kinds):
        out = [i for i, t in enumerate(before) if 0 < t.numel() <= _SMALL]
    else:
        out = [i for i, (b, a, g) in enumerate(zip(before, after, grads))
               if 0 < b.numel() <= _SMALL and all(t.layout is torch.strided
                                                  and t.dtype.is_floating_point
                                                  for t in (b, a, g))]
    return out if len(out) >= 8 else []


def _batched_norms(before: list[torch.Tensor], after: list[torch.Tensor],
                   grads: list[torch.Tensor]) -> torch.Tensor:
    """:func:`step_norms` rows of many small tensors from three concatenations, summed per
    tensor in float64 (a (4, S) float64 tensor; ``before`` is left as it is)."""
    sizes = [t.numel() for t in before]
    b, a, g = (torch.cat([t.flatten() for t in ts]).double() for ts in (before, after, grads))
    u = b - a
    terms = torch.empty(4, b.numel(), dtype=torch.float64, device=b.device)
    for row, (x, y) in enumerate(((g, g), (b, b), (u, u), (u, g))):
        torch.mul(x, y, out=terms[row])
    sums = _segment_sums(terms, sizes)
    sums[:3].sqrt_()
    return sums


def _segment_sums(terms: torch.Tensor, sizes: list[int], host: bool | None = None
                  ) -> torch.Tensor:
    """Sums of consecutive column runs of ``terms`` (run j: ``sizes[j]`` > 0 columns); on the
    host (default: a CPU tensor) by numpy's reduceat, a fifth of segment_reduce's time."""
    if terms.device.type == "cpu" if host is None else host:
        starts = np.concatenate(([0], np.cumsum(sizes[:-1])))
        return torch.from_numpy(np.add.reduceat(terms.numpy(), starts, axis=1))
    lengths = _index(tuple(sizes), terms.device).expand(terms.shape[0], -1).contiguous()
    return torch.segment_reduce(terms, "sum", lengths=lengths, axis=1, initial=0.0)


def _grouped_norms(before: list[torch.Tensor], after: list[torch.Tensor],
                   grads: list[torch.Tensor]) -> torch.Tensor:
    cols: tuple[list, list, list, list] = ([], [], [], [])
    # a group's lists fit in L2 together, so its five passes read memory once per list:
    # the norms taken before the step instead (while the snapshot was made) read the
    # gradients a second time, 10% of a transformer's sampled step
    for lo, hi in _groups(before):
        b, g = before[lo:hi], grads[lo:hi]
        cols[1].extend(_norms(b))
        torch._foreach_sub_(b, after[lo:hi])
        cols[2].extend(_norms(b))
        cols[0].extend(_norms(g))
        cols[3].extend(_dots(b, g))
    return torch.stack((*cols[0], *cols[1], *cols[2], *cols[3])).view(4, -1)


_GROUP = 1 << 17  # values per group of step_norms' passes: 4 x 512 KB in float32


def _groups(ts: list[torch.Tensor]) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges of ``ts`` holding about ``_GROUP`` values each."""
    out, lo, n = [], 0, 0
    for i, t in enumerate(ts):
        n += t.numel()
        if n >= _GROUP:
            out.append((lo, i + 1))
            lo, n = i + 1, 0
    if lo < len(ts):
        out.append((lo, len(ts)))
    return out


def _dots(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`_dot` of each pair; dense float32 pairs below ``_BIG`` go straight to vdot
    (per-call checks cost as much as a small tensor's dot)."""
    out = []
    for x, y in zip(a, b):
        if (x.dtype is _F32 and y.dtype is _F32 and y.layout is torch.strided
                and x.numel() <= _BIG):
            out.append(torch.vdot(x.reshape(-1), y.reshape(-1)))
        else:
            out.append(_dot(x, y))
    return out


def finish_stats(norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From :func:`step_norms`: a (5, P) table whose rows are the ``STAT_ROWS`` topics (grad,
    param and update norms, update/ratio, update/cos_grad) and the three total norms, on the
    norms' device."""
    with torch.no_grad():
        g, w, u = norms[:3]
        # a zero-norm parameter (a zero-initialised bias) has no meaningful ratio: NaN says so
        ratio = torch.where(w > 0, u / w, math.nan)
        cos = norms[3] / (u * g).clamp_min(_TINY)
        return (torch.cat((norms[:3], ratio.unsqueeze(0), cos.unsqueeze(0))),
                norms[:3].square().sum(1).sqrt())


def finish_stats_host(norms: list[list[float]]) -> tuple[list[list[float]], list[float]]:
    """:func:`finish_stats` on host floats (``norms.tolist()`` of a CPU tensor): a dozen tensor
    calls on a few numbers cost more than the arithmetic, so a CPU step does it in Python."""
    g, w, u, dots = norms
    ratio = [b / a if a > 0 else math.nan for a, b in zip(w, u)]
    cos = [d / max(x * y, _TINY) for d, x, y in zip(dots, u, g)]  # max keeps a NaN first arg
    return [g, w, u, ratio, cos], [math.sqrt(math.fsum(x * x for x in row)) for row in (g, w, u)]


# Tensors above this size are reduced in rows of _ROW values whose results are summed in
# float64: a float32 sum over 16M values is off by up to ~1e-3 relative (torch's own norm and
# get_total_norm too); rows bring that to ~1e-9 at the same cost, where float64 throughout
# costs 30x on CPU.
_BIG = 1 << 16
_ROW = 4096


def _norms(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    # accumulated and returned in float32 (bf16 norms keep 3 digits); torch refuses to narrow
    # float64 that way, so a list holding float64 keeps its dtype; an all-float32 list is
    # asked for no dtype, which torch's CPU path takes at half the cost
    ts, dtypes = _plain(ts)
    wide = torch.float64 in dtypes
    big = [i for i, t in enumerate(ts) if t.numel() > _BIG and t.dtype is not torch.float64]
    taken = set(big)
    small = [t for i, t in enumerate(ts) if i not in taken] if big else ts
    if not small:
        out = []
    elif dtypes <= {_F32} or wide:
        out = list(torch._foreach_norm(small, 2))
    else:
        out = list(torch._foreach_norm(small, 2, dtype=_F32))
    for i in big:
        out.insert(i, _row_sums(ts[i]).sqrt().to(torch.float64 if wide else _F32))
    return out


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> in float32 (float64 if either is); a big one by rows summed in float64. ``b``
    may be sparse (the entries of ``a`` at its indices are taken) or complex (the real inner
    product: Re <a, b>)."""
    if b.layout is not torch.strided:
        b = b.coalesce()
        a, b = a[tuple(b._indices())], b._values()
    if a.is_complex() or b.is_complex():
        a, b = entries(a), entries(b)
    if a.numel() > _BIG and torch.float64 not in (a.dtype, b.dtype):
        return _row_sums(_flat32(a), _flat32(b)).float()
    return torch.vdot(_flat32(a), _flat32(b))


def _row_sums(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """sum(a * a) (or sum(a * b)) as float64: float32 sums over rows of ``_ROW`` values, the
    rows' sums added in float64."""
    a = a.reshape(-1)
    b = a if b is None else b.reshape(-1)
    k = a.numel() // _ROW * _ROW
    if b is a:
        rows = torch.linalg.vector_norm(a[:k].view(-1, _ROW), dim=1, dtype=_F32).double()
        total = rows.square().sum()
        tail = torch.linalg.vector_norm(a[k:], dtype=_F32).double().square()
    else:
        total = torch.linalg.vecdot(a[:k].view(-1, _ROW), b[:k].view(-1, _ROW)).double().sum()
        tail = torch.vdot(a[k:], b[k:]).double()
    return total + tail


def _flat32(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1)
    return t if t.dtype is _F32 else t.float()


SAMPLE_VALUES = 1024  # per tensor, for its histogram
SAMPLE_BUDGET = 1 << 20  # per histogram topic and step, over all tensors


def sample_size(tensors: int) -> int:
    """Values sampled per tensor when ``tensors`` are histogrammed in one step:
    ``SAMPLE_VALUES``, fewer (at least 64) where that would pass ``SAMPLE_BUDGET`` in all, so
    a histogram step costs the writers the same on a 5,000-tensor model as on a 1,000-one."""
    return max(64, min(SAMPLE_VALUES, SAMPLE_BUDGET // max(1, tensors)))


def value_sample(t: torch.Tensor, max_values: int = SAMPLE_VALUES) -> torch.Tensor:
    """An evenly strided sample of at most ``max_values`` entries, for histograms (of a
    sparse tensor its stored values, of a complex one its real and imaginary parts)."""
    flat = entries(t.detach()).reshape(-1)
    stride = max(1, -(-flat.numel() // max_values))
    return flat[::stride]


def group_step_norms(norms: torch.Tensor, index: torch.Tensor, groups: int) -> torch.Tensor:
    """:func:`step_norms` of parameter groups (modules): ``index[i]`` is the group of column
    i. Norms combine as the root of summed squares and <-update, g> as a sum, so a group's
    column equals the step norms of its parameters concatenated into one tensor."""
    with torch.no_grad():
        parts = torch.cat((norms[:3].square(), norms[3:4]))
        out = torch.zeros(4, groups, dtype=norms.dtype, device=norms.device)
        out.index_add_(1, index, parts)
        out[:3].sqrt_()
        return out
