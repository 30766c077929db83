"""Where the probe's overhead goes inside real training steps: the gate's small CNN + AdamW.

Times the probe's own pre- and post-step hooks (median µs, unsampled and sampled steps apart)
and the average per step at ``every``; the gate (`make bench`) measures the same overhead as
a ratio of whole steps, which is noisier. Run from the repository root:
``PYTHONPATH=. python scripts/probe_cost.py [--every 10] [--steps 500]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from probe.gates import probed_step_callable
from tests.benchmarks.conftest import small_cnn


def hook_costs(every: int, steps: int) -> dict[str, float]:
    """Median µs of the probe's hooks per kind of step, and the per-step average."""
    torch.manual_seed(0)
    model = small_cnn()
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step, p = probed_step_callable(model, opt, x, y, every=every, collectors=[])
    times: dict[str, list[float]] = {"unsampled": [], "sampled": []}
    pending = [0.0, False]

    def pre(*args) -> None:
        t = time.perf_counter()
        p._pre_step(*args)
        pending[0], pending[1] = time.perf_counter() - t, p.bus.sampled

    def post(*args) -> None:
        t = time.perf_counter()
        p._post_step(*args)
        times["sampled" if pending[1] else "unsampled"].append(
            pending[0] + time.perf_counter() - t)

    for h in p._handles:  # the same hooks, timed from outside
        h.remove()
    p._handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    for _ in range(30):
        step()
    for v in times.values():
        v.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    step_ms = (time.perf_counter() - t0) / steps * 1e3
    p.close()
    out = {k: statistics.median(v) * 1e6 for k, v in times.items() if v}
    out["average"] = (out.get("unsampled", 0.0) * (every - 1) + out["sampled"]) / every
    out["step_ms"] = step_ms
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--steps", type=int, default=500)
    args = ap.parse_args()
    if args.every < 1 or args.steps < args.every:
        ap.error("--every must be >= 1 and --steps >= --every")
    torch.set_num_threads(1)  # as the gates run
    c = hook_costs(args.every, args.steps)
    print(f"every={args.every}: hooks {c.get('unsampled', 0.0):.0f} µs on an unsampled step, "
          f"{c['sampled']:.0f} µs on a sampled one, {c['average']:.0f} µs per step on average; "
          f"the whole step {c['step_ms']:.2f} ms ({c['average'] / (c['step_ms'] * 10):.2f}%)")


if __name__ == "__main__":
    main()
