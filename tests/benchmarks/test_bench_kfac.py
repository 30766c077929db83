"""Gates for K-FAC: the Woodbury G side against the eigendecomposition it replaces, and the
amortized cost of a K-FAC step against SGD on the small CNN (interleaved, probe_gate)."""

import copy

import torch

import hooks
from optimizers import KFAC
from optimizers.kfac_math import (
    lowrank_natural_gradient,
    natural_gradient,
    woodbury_natural_gradient,
)
from probe.gates import step_callable
from tests.benchmarks.conftest import small_cnn


def _wide_layer():
    """(grad, A, U, G = U Uᵀ/T) of a layer with out_dim 2048 backed by T = 128 rows, A 257 x 257."""
    g = torch.Generator().manual_seed(0)
    out_dim, in_dim, T = 2048, 256, 128
    U = torch.randn(out_dim, T, generator=g)
    a = torch.randn(4 * in_dim, in_dim + 1, generator=g)
    grad = torch.randn(out_dim, in_dim + 1, generator=g)
    return grad, a.T @ a / a.shape[0], U, U @ U.T / T


def test_woodbury_vs_eig_out2048_t128(probe_gate):
    """One layer's inverse refresh and preconditioning, out_dim 2048 backed by T = 128 rows:
    Woodbury (a 128 x 128 Cholesky) against eig (a 2048 x 2048 eigh); A is 257 x 257 in both."""
    grad, A, U, G = _wide_layer()
    probe_gate(lambda: woodbury_natural_gradient(grad, A, U, 1e-3, max_condition=1e6),
               lambda: natural_gradient(grad, A, G, 1e-3, max_condition=1e6),
               max_ratio=0.3, warmup=1, rounds=3)


def test_kfac_amortized_step_vs_sgd(probe_gate, cnn_batch):
    """100 training steps per round (one inverse refresh, ten factor collections) with K-FAC
    at factor_every=10, inverse_every=100 against 100 steps of SGD with momentum."""
    torch.manual_seed(0)
    base = small_cnn()
    sgd_model, kfac_model = copy.deepcopy(base), copy.deepcopy(base)
    x, y = cnn_batch
    kfac = KFAC(kfac_model, lr=0.05, momentum=0.9, factor_every=10, inverse_every=100,
                bus=hooks.Bus())
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.05, momentum=0.9)
    probe_gate(step_callable(kfac_model, kfac, x, y), step_callable(sgd_model, sgd, x, y),
               max_ratio=1.5, warmup=1, rounds=7, inner=100)


def test_lowrank_exact_vs_eig_out2048_t128(probe_gate):
    """The default Woodbury path (exact Tikhonov damping, G's eigenpairs from the T x T Gram)
    against the out x out eigh it stands in for, on the same layer as the factored gate."""
    grad, A, U, G = _wide_layer()
    probe_gate(lambda: lowrank_natural_gradient(grad, A, U, 1e-3, max_condition=1e6),
               lambda: natural_gradient(grad, A, G, 1e-3, max_condition=1e6),
               max_ratio=0.3, warmup=1, rounds=3)
