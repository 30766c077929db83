"""Gates for Muon: its step vs torch.optim.Muon, shape batching, and the cost of its telemetry.

Each gate times the optimizer step alone (gradients are set once), candidate and baseline
interleaved, torch single-threaded (tests/benchmarks/conftest.py).
"""

import pytest
import torch

import hooks
from optimizers import Muon


def transformer_shapes(d: int, layers: int) -> list[tuple[int, int]]:
    """The matrices of ``layers`` transformer blocks of width ``d``: qkv, out, MLP in/out."""
    return [(3 * d, d)] * layers + [(d, d)] * layers + [(4 * d, d)] * layers \
        + [(d, 4 * d)] * layers


def with_grads(shapes, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    return ps


class _Discard:
    def handle(self, events):
        pass


def driven(opt: Muon, bus: hooks.Bus):
    """One step as a probe drives it: begin_step, step, end_step (every step sampled)."""
    state = {"step": 0}

    def run() -> None:
        bus.begin_step(state["step"])
        opt.step()
        bus.end_step()
        state["step"] += 1

    return run


def test_step_vs_torch_muon(probe_gate):
    # same parameters and the same NS precision as torch.optim.Muon, which is always bf16
    shapes = transformer_shapes(128, 4)
    ours = Muon(with_grads(shapes), lr=0.02, ns_dtype="bfloat16", bus=hooks.Bus())
    ref = torch.optim.Muon(with_grads(shapes), lr=0.02, weight_decay=0.0)
    probe_gate(ours.step, ref.step, max_ratio=1.0, warmup=3, rounds=25)


@pytest.mark.parametrize("width,layers,ns_dtype", [(32, 48, "float32"), (64, 48, "bfloat16")])
def test_shape_batching(probe_gate, width, layers, ns_dtype):
    # a deep narrow MLP: many same-shaped layers, where per-call overhead dominates NS
    shapes = [(width, width)] * layers
    batched = Muon(with_grads(shapes), ns_dtype=ns_dtype, bus=hooks.Bus())
    single = Muon(with_grads(shapes), ns_dtype=ns_dtype, batch_shapes=False, bus=hooks.Bus())
    probe_gate(batched.step, single.step, max_ratio=0.7, warmup=3, rounds=20)


def test_telemetry_overhead_every_step(probe_gate):
    # every muon/* topic and span wanted at every step, against nobody listening
    shapes = transformer_shapes(256, 3)
    on_bus, off_bus = hooks.Bus(every=1), hooks.Bus(every=1)
    on_bus.subscribe(_Discard(), "*")
    on = Muon(with_grads(shapes), bus=on_bus)
    off = Muon(with_grads(shapes), bus=off_bus)
    probe_gate(driven(on, on_bus), driven(off, off_bus), max_ratio=1.10, warmup=2, rounds=20)


@pytest.mark.cuda
def test_default_step_vs_torch_muon_cuda(probe_gate):
    # defaults on CUDA: ns_dtype "auto" is bf16, as torch.optim.Muon; same-shaped layers batch
    shapes = transformer_shapes(512, 6)

    def on_cuda(ps):
        return [p.detach().cuda().requires_grad_() for p in ps]

    ours_p, ref_p = on_cuda(with_grads(shapes)), on_cuda(with_grads(shapes))
    for p, q in zip(ours_p, ref_p):
        p.grad, q.grad = torch.randn_like(p) * 1e-2, torch.randn_like(q) * 1e-2
    ours = Muon(ours_p, lr=0.02, bus=hooks.Bus(device="cuda"))
    ref = torch.optim.Muon(ref_p, lr=0.02, weight_decay=0.0)

    def synced(step):
        def run() -> None:
            step()
            torch.cuda.synchronize()
        return run

    probe_gate(synced(ours.step), synced(ref.step), max_ratio=1.0, warmup=5, rounds=30)
