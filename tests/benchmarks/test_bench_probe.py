"""Gate: the probe's overhead on a small CNN with AdamW, attached vs bare, interleaved."""

import copy

import pytest
import torch

from probe.gates import probed_step_callable, step_callable
from tests.benchmarks.conftest import small_cnn


@pytest.mark.parametrize("every,max_ratio", [(10, 1.03), (1, 1.25)])
def test_probe_overhead(probe_gate, cnn_batch, every, max_ratio):
    torch.manual_seed(0)
    bare_model = small_cnn()
    probed_model = copy.deepcopy(bare_model)
    x, y = cnn_batch
    bare = step_callable(bare_model, torch.optim.AdamW(bare_model.parameters(), lr=1e-3), x, y)
    probed, p = probed_step_callable(probed_model,
                                     torch.optim.AdamW(probed_model.parameters(), lr=1e-3),
                                     x, y, every=every, collectors=[])
    try:
        probe_gate(probed, bare, max_ratio=max_ratio, warmup=20, rounds=200,
                   label=f"probe overhead, small CNN + AdamW, every={every}")
    finally:
        p.close()
