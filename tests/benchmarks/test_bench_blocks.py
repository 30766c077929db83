"""Gate: BlockSchedule(AdamW) against full AdamW on a deep residual MLP, equal steps.

Both runs start from the same weights and see the same batches. Each timed call is one probe
cycle (``PROBE_EVERY`` steps: one full probe step and the suffix steps after it), so the
gate's ratio is the schedule's steady cost per step, probes included. After the gate,
both models have taken the same number of steps; the final held-out loss gap is recorded
next to the time ratio in ``benchmark.extra_info`` and bounded.
"""

import copy
import math

import pytest
import torch
from torch import nn

from optimizers import BlockSchedule

DEPTH, WIDTH, D_IN, CLASSES, BATCH = 12, 128, 32, 10, 64
PROBE_EVERY, WARMUP_CYCLES, ROUNDS = 10, 4, 36
STEPS = PROBE_EVERY * (WARMUP_CYCLES + ROUNDS)


class Residual(nn.Module):
    """Pre-norm residual MLP block: ``x + W2 relu(W1 norm(x))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


def deep_mlp() -> tuple[nn.Module, list[nn.Module]]:
    """Stem, ``DEPTH`` residual blocks and a head; the blocks list holds all of them in order
    (the stem first, so a frozen front really stops backward)."""
    blocks = [nn.Linear(D_IN, WIDTH), *[Residual(WIDTH) for _ in range(DEPTH)],
              nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, CLASSES))]
    return nn.Sequential(*blocks), blocks


def teacher_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs labelled by a fixed random two-layer teacher."""
    g = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(D_IN, 64, generator=g), torch.randn(64, CLASSES, generator=g)
    x = torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))
    return x, (torch.tanh(x @ w1) @ w2).argmax(1)


def trainer(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
            steps: int):
    """A callable running ``steps`` training steps on seeded batches; ``.count`` = steps."""
    gen = torch.Generator().manual_seed(7)
    schedule = isinstance(opt, BlockSchedule)

    def run() -> None:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (BATCH,), generator=gen)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step(loss.detach()) if schedule else opt.step()
            opt.zero_grad(set_to_none=True)
            run.count += 1
            run.active += opt.active if schedule else DEPTH + 2

    run.count = 0
    run.active = 0
    return run


def held_out_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = model(x)
        return (nn.functional.cross_entropy(out, y).item(),
                (out.argmax(1) == y).float().mean().item())


@pytest.fixture
def one_thread():
    # on a shared 2-core machine two intra-op threads spend their time contending, which
    # swamps the backward time the schedule saves; one thread times the work itself
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# "budget": the defaults (threshold 0.9, loss budget on); on this MLP the stem carries the
# largest relevance, so the relevance alone keeps every block and the falling loss shrinks
# the suffix. "relevance": the budget off and threshold 0.5, so only relevance decides.
VARIANTS = {
    "budget": ({"threshold": 0.9}, 0.9),
    "relevance": ({"threshold": 0.5, "shrink_below": 0.0, "grow_above": math.inf}, 1.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_block_schedule_equal_steps(probe_gate, benchmark, one_thread, variant, request):
    kw, max_ratio = VARIANTS[variant]
    cap = request.config.getoption("--probe-gate-max-rounds", None)
    if cap is not None and cap < ROUNDS and not benchmark.disabled:
        pytest.skip(f"the schedule needs {ROUNDS} rounds to reach its steady state and "
                    f"recovery; --probe-gate-max-rounds={cap} would gate its warm-up")
    torch.manual_seed(0)
    base_model, _ = deep_mlp()
    cand_model = copy.deepcopy(base_model)
    cand_blocks = list(cand_model)
    xtr, ytr = teacher_data(8192, seed=1)
    xte, yte = teacher_data(2048, seed=2)
    base_opt = torch.optim.AdamW(base_model.parameters(), lr=1e-3, weight_decay=1e-4)
    cand_opt = BlockSchedule(torch.optim.AdamW(cand_model.parameters(), lr=1e-3,
                                               weight_decay=1e-4),
                             cand_blocks, freeze_after=WARMUP_CYCLES * PROBE_EVERY,
                             probe_every=PROBE_EVERY, total_steps=STEPS,
                             final_full_fraction=0.1, **kw)
    base = trainer(base_model, base_opt, xtr, ytr, PROBE_EVERY)
    cand = trainer(cand_model, cand_opt, xtr, ytr, PROBE_EVERY)
    gate = probe_gate(cand, base, max_ratio=max_ratio, warmup=WARMUP_CYCLES, rounds=ROUNDS,
                      label=f"blocks/{variant}")

    # equal steps (STEPS unless --probe-gate-max-rounds cut the rounds)
    assert cand.count == base.count
    base_loss, base_acc = held_out_loss(base_model, xte, yte)
    cand_loss, cand_acc = held_out_loss(cand_model, xte, yte)
    gap = cand_loss - base_loss
    cand_times = list(benchmark.stats.stats.data)
    mean_ratio = sum(cand_times) / sum(benchmark.extra_info["baseline_times_s"])
    benchmark.extra_info.update({
        "variant": variant, "steps": cand.count, "blocks": len(cand_blocks),
        "mean_active_blocks": cand.active / cand.count,
        "step_time_ratio": gate.ratio, "mean_time_ratio": mean_ratio,
        "final_loss_full": base_loss, "final_loss_schedule": cand_loss,
        "final_loss_gap": gap,
        "final_accuracy_full": base_acc, "final_accuracy_schedule": cand_acc,
    })
    print(f"\n[{variant}] block schedule vs full AdamW, {cand.count} steps: step time ratio "
          f"{gate.ratio:.3f} (median; mean {mean_ratio:.3f}), "
          f"mean active {cand.active / cand.count:.1f}/{len(cand_blocks)} blocks, held-out "
          f"loss {cand_loss:.4f} vs {base_loss:.4f} (gap {gap:+.4f}), accuracy "
          f"{cand_acc:.3f} vs {base_acc:.3f}")
    assert gap <= 0.05 * base_loss, "the schedule lost too much against full training"
