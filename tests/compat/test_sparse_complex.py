"""Gradients that are not dense real tensors: an nn.Embedding(sparse=True) (SGD and Adagrad
take its sparse COO gradient) and a complex nn.Parameter. The references treat a complex
tensor as the real vector of its (real, imag) pairs, so cos_grad is Re<-update, grad> over
the norms, and a sparse gradient as its coalesced dense value."""

import pytest
import torch
from torch import nn

from tests.compat import harness as h


class EmbedNet(nn.Module):
    """A sparse-gradient embedding feeding a dense linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 4, sparse=True)
        self.out = nn.Linear(4, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(idx))


def index_batch(step: int) -> tuple:
    g = torch.Generator().manual_seed(3000 + step)
    return torch.randint(0, 8, (16,), generator=g), torch.randn(16, 3, generator=g)


SPARSE = {
    "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    "SGD-momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "Adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1),
}


@pytest.mark.parametrize("name", list(SPARSE))
def test_sparse_gradient_training_is_unchanged(name):
    plain, probed = h.both(EmbedNet, SPARSE[name], data=index_batch)
    h.assert_same_params(plain.model, probed.model)


@pytest.mark.parametrize("name", list(SPARSE))
def test_sparse_gradient_statistics(name):
    run = h.train(EmbedNet, SPARSE[name], probed=True, data=index_batch)
    h.check_stats(run.recorder, run.refs)


class ComplexNet(nn.Module):
    """A complex weight (a unitary-ish mixing layer) and a real bias."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 6, dtype=torch.complex64) * 0.5)
        self.b = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.complex64) @ self.w.T).abs() + self.b


COMPLEX = {
    "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "Adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    "AdamW-foreach": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=True),
}


@pytest.mark.parametrize("name", list(COMPLEX))
def test_complex_parameter_training_is_unchanged(name):
    plain, probed = h.both(ComplexNet, COMPLEX[name])
    h.assert_same_params(plain.model, probed.model)


@pytest.mark.parametrize("name", list(COMPLEX))
def test_complex_parameter_statistics(name):
    run = h.train(ComplexNet, COMPLEX[name], probed=True)
    h.check_stats(run.recorder, run.refs)
