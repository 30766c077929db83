"""K-FAC's per-layer bookkeeping: the rows behind A and G for ``nn.Linear`` and ``nn.Conv2d``,
their sums over one collection, and the layer's factors and inverses.

Rows: a Linear layer gives one row per input vector (all leading dimensions flattened), a
Conv2d layer one row per output position (its input patch, unfolded). The bias is an extra
ones column of ``a``. Output-gradient rows are multiplied by the batch size ``N`` to undo the
``1/N`` of a mean-reduced loss. ``A`` averages over all ``T`` rows, ``G`` sums over a sample's
rows and averages over the ``N`` samples (KFAC-expand, Grosse & Martens 2016; curvlinops'
``kfac_approx="expand"``), so ``A ⊗ G`` has the scale of the per-sample empirical Fisher for
convolutions and sequence inputs too, whatever the batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be preconditioned (None when it can)."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return f"{type(module).__name__} is not nn.Linear or nn.Conv2d"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"grouped convolution (groups={module.groups})"
    if not module.weight.requires_grad:
        return "frozen weight"
    if module.weight.numel() == 0:  # a pruned-away layer: no factor to estimate or invert
        return "zero-size weight"
    return None


def _conv_padded(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` (batched) padded the way the conv pads it."""
    if x.ndim == 3:  # an unbatched input [C, H, W]
        x = x.unsqueeze(0)
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    pad = module.padding
    if pad == "valid":
        return x
    if pad == "same":  # possibly asymmetric, as the conv does it
        lr: list[int] = []
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size)):
            total = d * (k - 1)
            lr += [total // 2, total - total // 2]
        return F.pad(x, lr)
    if pad == (0, 0):
        return x
    return F.pad(x, (pad[1], pad[1], pad[0], pad[0]))


def conv_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The conv's input patches as columns ``[C*kh*kw, N*Ho*Wo]`` (channel-major rows, like
    ``weight.view(out, -1)``): strided views and one copy whose inner loop runs along the
    input's rows, many times faster on CPU than ``F.unfold`` or a patch-major copy."""
    xp = _conv_padded(module, x)
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    # windows of the dilated extent, then every d-th element of each window
    v = xp.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    v = v[..., ::dh, ::dw]  # [N, C, Ho, Wo, kh, kw]
    n, c, ho, wo = v.shape[:4]
    return v.permute(1, 4, 5, 0, 2, 3).reshape(c * kh * kw, n * ho * wo)


def _input_columns(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``aᵀ`` ``[in, T]`` (a view where possible) and the batch size ``N``."""
    if isinstance(module, nn.Conv2d):
        return conv_patches(module, x), (x.shape[0] if x.ndim == 4 else 1)
    return x.reshape(-1, x.shape[-1]).mT, (x.shape[0] if x.ndim > 1 else 1)


def gram(cols: torch.Tensor) -> torch.Tensor:
    """``cols @ colsᵀ``, computing the symmetric result's lower half by blocks (3/4 of the
    multiply-adds) when it is large enough for that to pay."""
    k = cols.shape[0]
    if k < 128:
        return cols @ cols.mT
    h = k // 2
    top, bottom = cols[:h], cols[h:]
    out = cols.new_empty((k, k))
    out[:h, :h] = top @ top.mT
    low = bottom @ top.mT
    out[h:, :h] = low
    out[:h, h:] = low.mT
    out[h:, h:] = bottom @ bottom.mT
    return out


def input_covariance(module: nn.Module, x: torch.Tensor, bias: bool, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, int, int]:
    """``(Σ a aᵀ, T, N)`` over the rows of input ``x``; the bias block is filled from the
    column sums instead of multiplying a ones column (no copy of the unfolded patches)."""
    cols, n = _input_columns(module, x)
    cols = cols.to(dtype)
    t = cols.shape[1]
    cov = gram(cols)
    if bias:
        k = cov.shape[0]
        aug = cov.new_empty((k + 1, k + 1))
        aug[:k, :k] = cov
        s = cols.sum(1)
        aug[:k, k] = s
        aug[k, :k] = s
        aug[k, k] = t
        cov = aug
    return cov, t, n


def grad_columns(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """The output-gradient rows behind G, as columns ``[out, T]``, from the output gradient
    ``g`` (before the batch-size factor, which :meth:`KFACLayer.add` applies)."""
    if isinstance(module, nn.Conv2d):
        if g.ndim == 3:
            g = g.unsqueeze(0)
        # channel-first copy: its inner loop runs along contiguous positions
        return g.transpose(0, 1).reshape(g.shape[1], -1)
    return g.reshape(-1, g.shape[-1]).mT


class KFACLayer:
    """One preconditioned layer: its parameters, the current collection, factors, inverses."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
        self.weight: nn.Parameter = module.weight
        b = module.bias
        self.bias: nn.Parameter | None = b if (b is not None and b.requires_grad) else None
        self.out_dim = self.weight.shape[0]
        self.w_in = self.weight[0].numel()
        self.in_dim = self.w_in + (1 if self.bias is not None else 0)
        self.dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        self.reset_collection()
        # factors: running A; running G (eig) or the latest rows U (woodbury)
        self.A: torch.Tensor | None = None
        self.G: torch.Tensor | None = None
        self.U: torch.Tensor | None = None  # [out, T]
        self.tokens = 0
        #: factors of the latest collection not folded in for being out of range (0-d int64
        #: tensor, None before the first collection), and their running total
        self.overflow: torch.Tensor | None = None
        self.overflows = torch.zeros((), dtype=torch.int64, device=self.weight.device)
        self.policy: str | None = None
        self.reason = ""
        self.clear_inverse()

    # -- one collection ------------------------------------------------------------------
    def reset_collection(self) -> None:
        self.a_sum: torch.Tensor | None = None
        # Σ g gᵀ = g_sum * g_scale: g_sum from max-abs-normalised rows, g_scale (a float64 0-d
        # tensor) holds the squared scales, so a sum that float32 can hold never overflows on
        # the way (gradients of 1e19 have products of 1e38)
        self.g_sum: torch.Tensor | None = None
        self.g_scale: torch.Tensor | None = None
        self.g_rows: list[torch.Tensor] = []
        self.rows = 0
        self.samples = 0  # N: the samples behind the rows (G's divisor)

    def add(self, a_cov: torch.Tensor, t: int, g: torch.Tensor, n: int, keep_rows: bool
            ) -> None:
        """Fold one forward/backward pair into the collection: input covariance ``a_cov``
        over ``t`` rows, output-gradient columns ``g`` ``[out, t]`` of a batch of ``n``
        (``keep_rows``: keep ``n g`` for a Woodbury factor instead of summing ``n² g gᵀ``)."""
        g = g.to(self.dtype)
        self.a_sum = a_cov if self.a_sum is None else self.a_sum + a_cov
        self.rows += t
        self.samples += n
        if keep_rows:
            self.g_rows.append(g * n)
        else:
            self.fold_rows()
            self._add_gram(g, float(n))

    def _add_gram(self, cols: torch.Tensor, n: float) -> None:
        """Add ``n² cols colsᵀ`` to the collection, range-safely: the product is taken of the
        columns divided by their largest magnitude ``m``, ``(n m)²`` kept in float64."""
        m = cols.abs().amax().clamp_min(torch.finfo(cols.dtype).tiny)
        unit = cols / m
        gg = unit @ unit.mT
        scale = (m.to(torch.float64) * n).square()
        if self.g_sum is None:
            self.g_sum, self.g_scale = gg, scale
            return
        top = torch.maximum(self.g_scale, scale)  # rescale both to the larger: ratios <= 1
        self.g_sum = self.g_sum * (self.g_scale / top).to(gg.dtype) \
            + gg * (scale / top).to(gg.dtype)
        self.g_scale = top

    def g_sum_over(self, divisor: int) -> torch.Tensor | None:
        """``Σ g gᵀ / divisor`` in the factor dtype (non-finite only when the result itself is
        out of range); None when nothing was summed."""
        if self.g_sum is None:
            return None
        return self.g_sum * (self.g_scale / divisor).to(self.g_sum.dtype)

    def fold_rows(self) -> None:
        """Turn kept rows into the dense sum ``Σ g gᵀ`` (the layer goes the eig way)."""
        if self.g_rows:
            cols = torch.cat(self.g_rows, 1) if len(self.g_rows) > 1 else self.g_rows[0]
            self._add_gram(cols, 1.0)
            self.g_rows = []

    def collected_rows(self) -> torch.Tensor:
        """The kept rows of this collection ``[t, out]`` (empty when none)."""
        if not self.g_rows:
            return self.weight.new_zeros((0, self.out_dim), dtype=self.dtype)
        cols = torch.cat(self.g_rows, 1) if len(self.g_rows) > 1 else self.g_rows[0]
        return cols.mT

    # -- inverses ------------------------------------------------------------------------
    def clear_inverse(self) -> None:
        self.QA = self.lA = self.QG = self.lG = self.A_inv = None
        self.wood = None
        self.inv_denom: torch.Tensor | None = None  # 1 / (λ_G λ_Aᵀ + damping)
        self.denom_damping: float | None = None
        self.inverse_policy: str | None = None
        self.inverse_inputs: dict | None = None  # the factors the inverse was built from
        self.stats: dict[str, torch.Tensor | float] = {}

    @property
    def ready(self) -> bool:
        """True once the layer has an inverse to precondition with."""
        return self.inverse_policy is not None

    def latest_rows(self) -> torch.Tensor | None:
        """The latest Woodbury rows ``U`` ``[out, T]``, also once folded into the inverse."""
        if self.U is not None:
            return self.U
        return self.wood.rows() if self.wood is not None else None

    def has_factors(self) -> bool:
        if self.A is None:
            return False
        return self.G is not None if self.policy == "eig" else self.U is not None

    # -- gradients -----------------------------------------------------------------------
    def grad_matrix(self) -> torch.Tensor | None:
        """``[∇W, ∇b]`` as ``[out, in (+1)]`` in the factor dtype (None without a grad)."""
        gw = self.weight.grad
        if gw is None:
            return None
        v = gw.detach().reshape(self.out_dim, -1).to(self.dtype)
        if self.bias is not None:
            gb = self.bias.grad
            gb = torch.zeros(self.out_dim, dtype=self.dtype, device=v.device) if gb is None \
                else gb.detach().to(self.dtype)
            v = torch.cat([v, gb[:, None]], dim=1)
        return v

    def split(self, ng: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """The preconditioned ``[out, in (+1)]`` matrix as (parameter, direction) pairs."""
        out = [(self.weight, ng[:, :self.w_in].reshape(self.weight.shape)
                .to(self.weight.dtype))]
        if self.bias is not None:
            out.append((self.bias, ng[:, self.w_in].to(self.bias.dtype)))
        return out

    def signature(self) -> dict:
        """What a saved state must agree with: kind, shapes, bias column."""
        return {"kind": self.kind, "out_dim": self.out_dim, "in_dim": self.in_dim,
                "has_bias": self.bias is not None,
                "weight_shape": tuple(self.weight.shape)}
