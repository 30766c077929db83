"""Median AdamW step time (CPU): no probe, the probe, the probe with on_nonfinite="skip".

Run from the repository root: ``PYTHONPATH=. python scripts/skip_overhead.py``.
"""

import time

import torch
from torch import nn

import hooks
import probe
from tests.helpers import Recorder


def median_step_us(model: nn.Module, x: torch.Tensor, mode: str, steps: int = 300) -> float:
    """Median wall time of ``opt.step()`` in microseconds under ``mode``."""
    opt = torch.optim.AdamW(model.parameters())
    p = None
    if mode != "none":
        p = probe.attach(opt, model=model, every=10, collectors=[Recorder()], bus=hooks.Bus(),
                         on_nonfinite=mode)
    model(x).sum().backward()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    if p is not None:
        p.close()
    times.sort()
    return times[len(times) // 2] * 1e6


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    x = torch.randn(64, 256)
    for mode in ("none", "report", "skip") * 2:
        print(f"{mode:7s} {median_step_us(model, x, mode):.1f} us median step")


if __name__ == "__main__":
    main()
