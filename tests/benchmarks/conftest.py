"""Shared models for the benchmark gates."""

import pytest
import torch
from torch import nn


def small_cnn() -> nn.Module:
    """The gates' small CNN: two convs and a head on 16x16 inputs."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


@pytest.fixture
def cnn_batch():
    torch.manual_seed(0)
    return torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
