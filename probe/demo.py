"""``probe demo``: a small conv net on scikit-learn's 8x8 digits, trained under the probe.

The data ships with scikit-learn (no download). Each optimizer in ``OPTIMIZERS`` trains the
same net from the same seed; the run folders hold TensorBoard events and events.jsonl.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import probe
from optimizers import KFAC, BlockSchedule, Falcon, Muon
from probe import verdicts
from probe.records import read_file

# name -> factory(model, total_steps) -> optimizer. Each optimizer issue adds its entry.
OPTIMIZERS: dict[str, Callable[[nn.Module, int], torch.optim.Optimizer]] = {
    "adamw": lambda model, total: torch.optim.AdamW(model.parameters(), lr=3e-3,
                                                    weight_decay=1e-4),
    # AdamW on a trailing suffix of [conv blocks..., head] chosen by gradient relevance
    "blocks": lambda model, total: BlockSchedule(
        torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4),
        [*model.blocks, model.head], threshold=0.8, freeze_after=0.1, probe_every=20,
        total_steps=total),
    # the head goes to Muon's AdamW fallback, as Muon's authors advise for output layers
    "muon": lambda model, total: Muon(
        [{"params": [(n, p) for n, p in model.named_parameters() if not n.startswith("head.")]},
         {"params": list(model.head.named_parameters(prefix="head")), "use_muon": False}],
        lr=0.02, lr_fallback=3e-3, wd_fallback=1e-4),
    "falcon": lambda model, total: Falcon(model.named_parameters(), lr=3e-3,
                                          total_steps=total),
    "kfac": lambda model, total: KFAC(model, lr=0.05, momentum=0.9, weight_decay=1e-4,
                                      damping=1e-3, factor_every=10, inverse_every=50),
}


def digits(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """scikit-learn's 8x8 digits as float tensors, split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    cut = int(0.8 * len(x))
    tr, te = perm[:cut], perm[cut:]
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return x[tr], y[tr], x[te], y[te]


class DigitsNet(nn.Module):
    """Three conv blocks and a linear head: small enough for 2 CPU cores, deep enough to probe."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()),
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
                          nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width),
                          nn.ReLU(), nn.MaxPool2d(2)),
        )
        self.head = nn.Linear(2 * width * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).flatten(1))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) on the given set."""
    model.eval()
    with torch.no_grad():
        out = model(x)
        loss = nn.functional.cross_entropy(out, y).item()
        acc = (out.argmax(1) == y).float().mean().item()
    model.train()
    return loss, acc


def train(name: str, steps: int, batch: int, every: int, logdir: str, seed: int,
          progress: bool = True, profile: bool = False) -> dict:
    """Train DigitsNet with optimizer ``name`` for ``steps`` steps under a probe."""
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = digits(seed)
    model = DigitsNet()
    opt = OPTIMIZERS[name](model, steps)
    inner = opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, len(xtr) // batch)
    bar = _bar(steps, name, progress)
    t0 = time.perf_counter()
    hparams = {"optimizer": name, "lr": float(inner.param_groups[0]["lr"]), "steps": steps,
               "batch": batch, "every": every, "seed": seed}
    interrupted = False
    with probe.attach(inner, model=model, logdir=logdir, every=every, hparams=hparams,
                      profile=profile) as p:
        step = 0
        try:
            while step < steps:
                perm = torch.randperm(len(xtr), generator=g)
                for i in range(steps_per_epoch):
                    if step >= steps:
                        break
                    idx = perm[i * batch:(i + 1) * batch]
                    loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    p.log("train/loss", loss.detach())
                    step += 1
                    bar.update(1)
                    if step % steps_per_epoch == 0 or step == steps:
                        eloss, acc = evaluate(model, xte, yte)
                        p.log("eval/loss", eloss)
                        p.log("eval/accuracy", acc)
                        bar.set_postfix(loss=f"{eloss:.3f}", acc=f"{acc:.3f}")
        except KeyboardInterrupt:
            # leaving the with flushes what was recorded; the summary shows the partial run
            interrupted = True
    bar.close()
    wall = time.perf_counter() - t0
    s = p.summary()
    step_times = _series(logdir, "step/time_ms")
    return {
        "optimizer": name, "logdir": logdir, "wall_s": wall, "steps": step,
        "interrupted": interrupted,
        "accuracy": s.get("eval/accuracy", {}).get("last", float("nan")),
        "eval_loss": s.get("eval/loss", {}).get("last", float("nan")),
        "step_ms_median": statistics.median(step_times) if step_times else float("nan"),
        "grad_norm": s.get("grad/norm", {}).get("last", float("nan")),
        "update_ratio_max": max((v["max"] for k, v in s.items()
                                 if v.get("topic") == "update/ratio" and "max" in v),
                                default=float("nan")),
        "nonfinite": s.get("anomaly/nonfinite", {}).get("max", 0.0),
        "warnings": _warnings(logdir),
        "summary": s,
        "traces": list(p.profiler.traces) if p.profiler is not None else [],
    }


def _warnings(logdir: str) -> list[str]:
    path = os.path.join(logdir, "events.jsonl")
    if not os.path.exists(path):
        return []
    by_topic: dict[str, list[dict]] = {}
    for r in read_file(path)[0]:
        by_topic.setdefault(r["topic"], []).append(r)
    return [v.message for v in verdicts.check(by_topic)]


def _series(logdir: str, topic: str) -> list[float]:
    from dashboards import read_events

    path = os.path.join(logdir, "events.jsonl")
    if not os.path.exists(path):
        return []
    good, _ = read_events(path)
    return [r["value"] for r in good if r["topic"] == topic and not r.get("tags")]


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{desc:>8}", unit="step", file=sys.stderr, leave=True,
                dynamic_ncols=True)


def table(results: list[dict]) -> str:
    """The demo's summary table, one row per optimizer."""
    head = f"{'optimizer':<10} {'steps':>6} {'accuracy':>8} {'eval loss':>9} {'step ms':>8} " \
           f"{'grad norm':>9} {'max upd/param':>13} {'nonfinite':>9} {'wall s':>7}"
    rows = [head, "-" * len(head)]
    for r in results:
        steps = f"{r.get('steps', '')}{'*' if r.get('interrupted') else ''}"
        rows.append(f"{r['optimizer']:<10} {steps:>6} {r['accuracy']:>8.3f} "
                    f"{r['eval_loss']:>9.3f} {r['step_ms_median']:>8.2f} {r['grad_norm']:>9.3f} "
                    f"{r['update_ratio_max']:>13.2e} {int(r['nonfinite']):>9d} "
                    f"{r['wall_s']:>7.1f}")
    if any(r.get("interrupted") for r in results):
        rows.append("* interrupted (Ctrl-C): the figures cover the steps run")
    warned = [(r["optimizer"], w) for r in results for w in r.get("warnings", [])]
    if warned:
        rows += ["", "Warnings (healthy ranges: docs/dashboards.md):"]
        rows += [f"  {name}: {w}" for name, w in warned]
    return "\n".join(rows)


def probe_command() -> str:
    """The command that runs this interpreter's ``probe`` from the current folder in a fresh
    shell (no activated venv): ``.venv/bin/python -m probe`` from the repository root."""
    exe = os.path.abspath(sys.executable)  # not resolved: a venv's python is a symlink
    rel = os.path.relpath(exe)
    shown = exe if rel.startswith(os.pardir) else rel
    if os.sep not in shown:
        shown = os.path.join(os.curdir, shown)  # a bare name would be looked up on PATH
    return f"{shlex.quote(shown)} -m probe"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The ``probe demo`` options."""
    ap.add_argument("--optimizer", default="all",
                    help=f"one of {', '.join(OPTIMIZERS)} or 'all' (default)")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run (300)")
    ap.add_argument("--batch", type=int, default=64, help="batch size (64)")
    ap.add_argument("--every", type=int, default=10, help="telemetry every N steps (10)")
    ap.add_argument("--runs", default="runs", help="folder for the run folders (runs)")
    ap.add_argument("--name", default=None, help="run name prefix (default: a timestamp)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--profile", action="store_true",
                    help="trace steps 2-4 with torch.profiler into each run folder")


def run(args: argparse.Namespace) -> int:
    """Run the demo for the chosen optimizers and print the summary (a partial one, exit
    status 130, when interrupted with Ctrl-C)."""
    names = list(OPTIMIZERS) if args.optimizer == "all" else [args.optimizer]
    for n in names:
        if n not in OPTIMIZERS:
            raise SystemExit(f"probe demo: --optimizer must be one of "
                             f"{', '.join(OPTIMIZERS)} or 'all', got {n!r}")
    for flag in ("steps", "batch", "every"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"probe demo: --{flag} must be >= 1, got {getattr(args, flag)}")
    stamp = args.name or time.strftime("%Y%m%d-%H%M%S")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    cmd = probe_command()
    os.makedirs(args.runs, exist_ok=True)
    print(f"Watch it live: {cmd} tensorboard {shlex.quote(args.runs)}", flush=True)
    results = []
    interrupted = False
    for n in names:
        logdir = os.path.join(args.runs, f"{stamp}-{n}")
        try:
            results.append(train(n, args.steps, args.batch, args.every, logdir, args.seed,
                                 progress=not args.no_progress,
                                 profile=getattr(args, "profile", False)))
        except KeyboardInterrupt:  # outside the training loop (set-up, evaluation)
            interrupted = True
            break
        if results[-1]["interrupted"]:
            interrupted = True
            break
    print()
    if not results:
        print("probe demo: interrupted before a run finished its set-up", file=sys.stderr)
        return 130
    print(table(results))
    print()
    print("Runs written to:")
    for r in results:
        print(f"  {r['logdir']}  (TensorBoard events + events.jsonl)")
        for t in r.get("traces", []):
            print(f"    profiler trace: {t}  (TensorBoard's PyTorch Profiler tab, Perfetto)")
    print()
    print("View them with (from this folder, no venv to activate):")
    print(f"  {cmd} tensorboard {shlex.quote(args.runs)}")
    print(f"  {cmd} report {' '.join(shlex.quote(r['logdir']) for r in results)} "
          f"--plots {shlex.quote(os.path.join(args.runs, stamp + '-plots'))}")
    return 130 if interrupted else 0
