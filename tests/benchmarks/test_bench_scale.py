"""Gates: the probe's cost on real model shapes, a ResNet-18 (62 tensors) and a 12-layer
transformer (150 tensors), AdamW, the default collectors (TensorBoard + JSON lines) writing
into a temporary folder; probed and bare steps interleaved in one process, on one model and
optimizer: the bare step runs with the probe paused (two copies of a model differ by a percent
or two per step on this machine, as much as the bounds below). The A/A gates time the bare
step against itself and show what ratio noise alone gives.

At every=1 each timed call is one step (all sampled). At every=10 a round is 10 probed steps
alternating one by one with 10 bare ones, and the ratio is the mean over the round's 10
positions of each position's median pair ratio (``interleave``): a slow spell of the VM hits
both calls of a pair, where rounds timed as two 10-step blocks spread 3-5% and 16 of them
could not resolve the bound. Each round holds exactly one sampled step (its first), and the
probe is flushed right after it inside its timing, so the writers' work on their threads is
charged to it in full rather than to the next (bare) step: an upper bound of the amortized
cost, by about the writers' CPU (1-2 ms a sampled step, 25 ms a histogram step). At every=100
a call is one step and the median is an unsampled step: the sampled step's cost, amortized
over 100 steps, is the every=1 overhead / 100, recorded next to it (extra_info).
"""

from __future__ import annotations

import pytest
import torch

from probe.gates import paused_callable, probed_step_callable
from tests.benchmarks.scale_models import ResNet18, Transformer, resnet_batch, transformer_batch

MODELS = {
    "resnet18": (ResNet18, resnet_batch),
    "transformer12": (Transformer, transformer_batch),
}


def _pair(name: str, tmp_path, every: int, collectors=None):
    make, batch = MODELS[name]
    torch.manual_seed(0)
    model = make()
    x, y = batch()
    kwargs = {"collectors": collectors} if collectors is not None else {"logdir": tmp_path}
    probed, p = probed_step_callable(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                                     x, y, every=every, **kwargs)
    return paused_callable(probed, p), probed, p, len(list(model.parameters()))


def _flushed_when_sampled(step, p, every: int):
    """``step``, then, after a sampled step, ``p.flush()``: its writers' work is timed with it."""
    def run() -> None:
        step()
        if (p.step - 1) % every == 0:
            p.flush()

    return run


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("every,max_ratio,inner,rounds", [
    (1, 1.10, 1, 50), (10, 1.02, 10, 16), (100, 1.01, 1, 120)])
def test_probe_overhead_at_scale(probe_gate, benchmark, tmp_path, name, every, max_ratio,
                                 inner, rounds):
    bare, probed, p, tensors = _pair(name, tmp_path, every)
    if inner > 1:
        probed = _flushed_when_sampled(probed, p, every)
    try:
        r = probe_gate(probed, bare, max_ratio=max_ratio, warmup=2, rounds=rounds, inner=inner,
                       interleave=inner > 1,
                       label=f"probe overhead, {name} ({tensors} tensors) + AdamW, "
                             f"TensorBoard + JSON lines, every={every}")
        per_step_ms = (r.candidate_median - r.baseline_median) * 1e3
        benchmark.extra_info["tensors"] = tensors
        benchmark.extra_info["overhead_ms_per_step"] = per_step_ms
        if every == 1:
            benchmark.extra_info["ms_per_sampled_step_per_tensor"] = per_step_ms / tensors
    finally:
        p.close()


@pytest.mark.parametrize("name", list(MODELS))
def test_statistics_floor_at_scale(probe_gate, benchmark, tmp_path, name):
    """A sampled step with no collector: the statistics alone (a snapshot, then three
    foreach norms and one dot per tensor in one pass), bounded by about one extra optimizer
    step."""
    bare, probed, p, tensors = _pair(name, tmp_path, 1, collectors=[])
    try:
        probe_gate(probed, bare, max_ratio=1.10, warmup=2, rounds=50,
                   label=f"probe statistics floor, {name} ({tensors} tensors), collectors=[], "
                         f"every=1")
    finally:
        p.close()


@pytest.mark.parametrize("name", list(MODELS))
def test_a_a_control_at_scale(probe_gate, benchmark, tmp_path, name):
    """The bare step against itself, with the every=100 gate's rounds: the ratio noise gives
    on this machine, next to the bounds it has to resolve."""
    bare, _, p, tensors = _pair(name, tmp_path, 100)
    try:
        r = probe_gate(bare, bare, max_ratio=1.01, warmup=2, rounds=120,
                       label=f"A/A control, {name} ({tensors} tensors) + AdamW, bare vs bare")
        benchmark.extra_info["tensors"] = tensors
        benchmark.extra_info["overhead_ms_per_step"] = \
            (r.candidate_median - r.baseline_median) * 1e3
    finally:
        p.close()
