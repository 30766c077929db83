"""Gates: Falcon's cost on the small CNN, interleaved against its baseline in one run.

- a training step (forward, backward, step) with Falcon vs with torch.optim.AdamW, masks
  rebuilt every 5 steps (the FALCON v2 claim: at most 1.2x) and every step (no claim to
  check: a regression bound of 1.3x, about 0.13 above the measured ratio);
- the filter of the three conv gradients with the power-iteration low-rank step vs exact SVD
  (at most 0.5x).
Nobody listens to the bus here: this is the cost a user pays with telemetry off. Torch runs
single-threaded (tests/benchmarks/conftest.py).
"""

import copy

import pytest
import torch

import hooks
from optimizers import Falcon
from optimizers.falcon import filter_grad
from probe.gates import step_callable
from tests.benchmarks.conftest import small_cnn


@pytest.mark.parametrize("mask_interval,max_ratio", [(5, 1.2), (1, 1.3)])
def test_falcon_step_vs_adamw(probe_gate, cnn_batch, mask_interval, max_ratio):
    torch.manual_seed(0)
    base_model = small_cnn()
    falcon_model = copy.deepcopy(base_model)
    x, y = cnn_batch
    opt = Falcon(falcon_model.named_parameters(), lr=1e-3, mask_interval=mask_interval,
                 total_steps=10_000, bus=hooks.Bus())
    assert len(opt.filtered_names) == 3
    falcon = step_callable(falcon_model, opt, x, y)
    adamw = step_callable(base_model, torch.optim.AdamW(base_model.parameters(), lr=1e-3), x, y)
    probe_gate(falcon, adamw, max_ratio=max_ratio, warmup=20, rounds=200,
               label=f"Falcon step (mask_interval={mask_interval}) / AdamW, small CNN")


def test_falcon_poweriter_vs_svd(probe_gate, cnn_batch):
    torch.manual_seed(0)
    model = small_cnn()
    x, y = cnn_batch
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters() if p.ndim == 4]
    masks = [filter_grad(g, 0.9).mask for g in grads]  # steady state: the mask is cached

    def filter_all(backend: str):
        return lambda: [filter_grad(g, 0.9, backend=backend, mask=m)
                        for g, m in zip(grads, masks)]

    probe_gate(filter_all("poweriter"), filter_all("svd"), max_ratio=0.5, warmup=20,
               rounds=100, label="Falcon filter, poweriter / svd, 3 conv gradients")
