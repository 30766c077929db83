"""Every torch.optim optimizer under the probe: the training is bit-identical with and without
it, and its per-parameter statistics equal float64 references (tests/compat/harness.py)."""

import pytest
import torch
from torch import nn

from tests.compat import harness as h

optim = torch.optim

# (id, factory); the fused and foreach variants are the ones torch 2.13 runs on CPU
CASES = [
    ("SGD", lambda m: optim.SGD(m.parameters(), lr=0.1)),
    ("SGD-momentum", lambda m: optim.SGD(m.parameters(), lr=0.1, momentum=0.9)),
    ("SGD-nesterov", lambda m: optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                     weight_decay=1e-2)),
    ("SGD-foreach", lambda m: optim.SGD(m.parameters(), lr=0.1, momentum=0.9, foreach=True)),
    ("SGD-fused", lambda m: optim.SGD(m.parameters(), lr=0.1, momentum=0.9, fused=True)),
    ("Adam", lambda m: optim.Adam(m.parameters(), lr=1e-2)),
    ("Adam-amsgrad", lambda m: optim.Adam(m.parameters(), lr=1e-2, amsgrad=True)),
    ("Adam-foreach", lambda m: optim.Adam(m.parameters(), lr=1e-2, foreach=True)),
    ("Adam-fused", lambda m: optim.Adam(m.parameters(), lr=1e-2, fused=True)),
    ("AdamW", lambda m: optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)),
    ("AdamW-foreach", lambda m: optim.AdamW(m.parameters(), lr=1e-2, foreach=True)),
    ("AdamW-fused", lambda m: optim.AdamW(m.parameters(), lr=1e-2, fused=True)),
    ("Adamax", lambda m: optim.Adamax(m.parameters(), lr=1e-2)),
    ("Adamax-foreach", lambda m: optim.Adamax(m.parameters(), lr=1e-2, foreach=True)),
    ("NAdam", lambda m: optim.NAdam(m.parameters(), lr=1e-2)),
    ("NAdam-decoupled-foreach", lambda m: optim.NAdam(m.parameters(), lr=1e-2, weight_decay=0.1,
                                                  decoupled_weight_decay=True, foreach=True)),
    ("RAdam", lambda m: optim.RAdam(m.parameters(), lr=1e-2)),
    ("RAdam-foreach", lambda m: optim.RAdam(m.parameters(), lr=1e-2, foreach=True)),
    ("Adagrad", lambda m: optim.Adagrad(m.parameters(), lr=1e-2)),
    ("Adagrad-foreach", lambda m: optim.Adagrad(m.parameters(), lr=1e-2, foreach=True)),
    ("Adagrad-fused", lambda m: optim.Adagrad(m.parameters(), lr=1e-2, fused=True)),
    ("Adadelta", lambda m: optim.Adadelta(m.parameters())),
    ("Adadelta-foreach", lambda m: optim.Adadelta(m.parameters(), foreach=True)),
    ("RMSprop", lambda m: optim.RMSprop(m.parameters(), lr=1e-2)),
    ("RMSprop-centered-momentum-foreach",
     lambda m: optim.RMSprop(m.parameters(), lr=1e-2, centered=True, momentum=0.5, foreach=True)),
    ("Rprop", lambda m: optim.Rprop(m.parameters(), lr=1e-2)),
    ("Rprop-foreach", lambda m: optim.Rprop(m.parameters(), lr=1e-2, foreach=True)),
    ("ASGD", lambda m: optim.ASGD(m.parameters(), lr=1e-2)),
    ("ASGD-foreach", lambda m: optim.ASGD(m.parameters(), lr=1e-2, foreach=True)),
    ("Adafactor", lambda m: optim.Adafactor(m.parameters(), lr=1e-2)),
    ("Adafactor-foreach", lambda m: optim.Adafactor(m.parameters(), lr=1e-2, foreach=True)),
]


@pytest.mark.parametrize("make_opt", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_dense_optimizer(make_opt):
    plain, probed = h.both(h.mlp, make_opt)
    h.assert_same_params(plain.model, probed.model)
    h.check_stats(probed.recorder, probed.refs)


def _muon_model() -> nn.Module:  # torch.optim.Muon takes 2-D parameters only
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False))


def test_torch_muon_on_2d_weights():
    plain, probed = h.both(_muon_model, lambda m: optim.Muon(m.parameters(), lr=0.02))
    h.assert_same_params(plain.model, probed.model)
    h.check_stats(probed.recorder, probed.refs)


# -- SparseAdam: an nn.Embedding(sparse=True) alone (SparseAdam refuses dense gradients) ------
def embedding() -> nn.Module:
    return nn.Embedding(12, 4, sparse=True)


def index_batch(step: int) -> tuple:
    g = torch.Generator().manual_seed(2000 + step)
    # repeated indices: the gradient is an uncoalesced sparse tensor, as nn.Embedding makes it
    return torch.randint(0, 8, (16,), generator=g), torch.randn(16, 4, generator=g)


def embedding_mse(model: nn.Module, data: tuple) -> torch.Tensor:
    idx, y = data
    return (model(idx) - y).square().mean()


def _sparse_adam(m: nn.Module) -> torch.optim.Optimizer:
    return optim.SparseAdam(m.parameters(), lr=1e-2)


def test_sparse_adam_training_is_unchanged():
    plain, probed = h.both(embedding, _sparse_adam, loss=embedding_mse, data=index_batch)
    h.assert_same_params(plain.model, probed.model)


def test_sparse_adam_statistics():
    run = h.train(embedding, _sparse_adam, probed=True, loss=embedding_mse, data=index_batch)
    h.check_stats(run.recorder, run.refs)


# -- LBFGS: the gradient it received is the one its first closure call made ------------------
def _lbfgs(m: nn.Module) -> torch.optim.Optimizer:
    return optim.LBFGS(m.parameters(), lr=0.5, max_iter=4, history_size=5)


def test_lbfgs_training_is_unchanged():
    plain, probed = h.both(h.mlp, _lbfgs, closure=True)
    h.assert_same_params(plain.model, probed.model)
    assert probed.probe.step == h.STEPS


def test_lbfgs_statistics():
    run = h.train(h.mlp, _lbfgs, probed=True, closure=True)
    h.check_stats(run.recorder, run.refs)
