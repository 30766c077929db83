"""What one read of the gradients for NaN/Inf costs inside real training steps: the floor of
an unsampled probed step. Times fwd+bwd+AdamW steps on a scale model with no check, with the
probe's check (torch's fused AMP finiteness pass) and with ``_foreach_norm``, interleaved, and
prints each check's own time and the whole step's median. Run from the repository root:
``PYTHONPATH=. python scripts/finiteness_cost.py [--model resnet18|transformer12] [--steps 150]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tests.benchmarks.scale_models import ResNet18, Transformer, resnet_batch, transformer_batch

MODELS = {"resnet18": (ResNet18, resnet_batch), "transformer12": (Transformer, transformer_batch)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(MODELS), default="transformer12")
    ap.add_argument("--steps", type=int, default=150, help="steps per variant (>= 20)")
    args = ap.parse_args()
    if args.steps < 20:
        ap.error("--steps must be >= 20")
    torch.set_num_threads(1)  # as the gates run
    torch.manual_seed(0)
    make, batch = MODELS[args.model]
    model = make()
    x, y = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params = list(model.parameters())
    found, one = torch.zeros(1), torch.ones(1)

    def amp(grads):
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
        return found.item()

    checks = {"none": lambda grads: None, "amp check (the probe's)": amp,
              "_foreach_norm": lambda grads: torch.stack(torch._foreach_norm(grads)).tolist()}
    step_s: dict[str, list[float]] = {k: [] for k in checks}
    check_s: dict[str, list[float]] = {k: [] for k in checks}
    names = list(checks)
    for i in range(args.steps * len(names)):
        k = names[i % len(names)]
        t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y.reshape(-1)).backward()
        grads = [p.grad for p in params]
        t = time.perf_counter()
        checks[k](grads)
        check_s[k].append(time.perf_counter() - t)
        opt.step()
        opt.zero_grad()
        step_s[k].append(time.perf_counter() - t0)
    base = statistics.median(step_s["none"][10:])
    mb = sum(p.numel() * p.element_size() for p in params) / 1e6
    print(f"{args.model}: {len(params)} tensors, {mb:.1f} MB of gradients")
    for k in names:
        s = statistics.median(step_s[k][10:])
        print(f"  {k:24s} check {statistics.median(check_s[k][10:]) * 1e6:7.0f} µs, "
              f"step {s * 1e3:7.2f} ms ({(s / base - 1) * 100:+.2f}%)")


if __name__ == "__main__":
    main()
