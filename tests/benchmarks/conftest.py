"""Shared models and settings for the benchmark gates."""

import os

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


@pytest.fixture(autouse=True, scope="session")
def _bench_threads():
    """Gates run torch single-threaded (OPTPROBE_BENCH_THREADS overrides): on a shared, loaded
    box intra-op threads wait on each other at every op's barrier, which turned a 2 s gate into
    50 s and made its ratios noise."""
    n = int(os.environ.get("OPTPROBE_BENCH_THREADS", "1"))
    if n < 1:
        raise ValueError(f"OPTPROBE_BENCH_THREADS must be an int >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield n
    torch.set_num_threads(before)
