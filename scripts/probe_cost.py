"""Where the probe's overhead goes inside real training steps, AdamW on the gate's small CNN
(8 tensors), a ResNet-18 (62), a 12-layer transformer (150) or 5,000 small tensors.

Times the probe's own pre- and post-step hooks (median µs, unsampled and sampled steps apart)
and the average per step at ``every``; the gates (`make bench`) measure the same overhead as
a ratio of whole steps, which is noisier. ``--files`` writes TensorBoard + JSON lines into a
temporary folder (their encoding runs on worker threads, outside the hooks). Run from the
repository root:
``PYTHONPATH=. python scripts/probe_cost.py [--model cnn|resnet18|transformer12|wide5000]
[--every 10]
[--steps 500] [--files]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from probe.gates import probed_step_callable, step_callable
from tests.benchmarks.conftest import small_cnn
from tests.benchmarks.scale_models import (
    ResNet18,
    Transformer,
    Wide,
    resnet_batch,
    transformer_batch,
    wide_batch,
)

MODELS = {
    "cnn": (small_cnn, lambda: (torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,)))),
    "resnet18": (ResNet18, resnet_batch),
    "transformer12": (Transformer, transformer_batch),
    "wide5000": (Wide, wide_batch),
}


def hook_costs(every: int, steps: int, model_name: str = "cnn",
               files: bool = False) -> dict[str, float]:
    """Median µs of the probe's hooks per kind of step, and the per-step average."""
    torch.manual_seed(0)
    make, batch = MODELS[model_name]
    model = make()
    x, y = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    bare = step_callable(model, opt, x, y)
    for _ in range(5):
        bare()
    t0 = time.perf_counter()
    for _ in range(steps):
        bare()
    bare_ms = (time.perf_counter() - t0) / steps * 1e3
    where = {"logdir": tempfile.mkdtemp(prefix="probe-cost-")} if files else {"collectors": []}
    step, p = probed_step_callable(model, opt, x, y, every=every, **where)
    t0 = time.perf_counter()
    step()  # the first probed step: names, buffers and files are made here
    first_ms = (time.perf_counter() - t0) * 1e3
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
    out["bare_ms"] = bare_ms
    out["first_ms"] = first_ms
    out["tensors"] = len(list(model.parameters()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--model", choices=list(MODELS), default="cnn")
    ap.add_argument("--files", action="store_true",
                    help="write TensorBoard + JSON lines (default: no collector)")
    args = ap.parse_args()
    if args.every < 1 or args.steps < args.every:
        ap.error("--every must be >= 1 and --steps >= --every")
    torch.set_num_threads(1)  # as the gates run
    c = hook_costs(args.every, args.steps, args.model, args.files)
    print(f"{args.model} ({c['tensors']} tensors), every={args.every}: hooks "
          f"{c.get('unsampled', 0.0):.0f} µs on an unsampled step, "
          f"{c['sampled']:.0f} µs on a sampled one, {c['average']:.0f} µs per step on average; "
          f"the whole step {c['step_ms']:.2f} ms ({c['average'] / (c['step_ms'] * 10):.2f}%) "
          f"against {c['bare_ms']:.2f} ms bare ({c['step_ms'] / c['bare_ms']:.2f}x); "
          f"the first probed step {c['first_ms']:.0f} ms")


if __name__ == "__main__":
    main()
