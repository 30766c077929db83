"""How far optimizers.Muon's updates are from torch.optim.Muon's, by case (docs/muon.md).

Usage: PYTHONPATH=. python scripts/muon_parity.py
Prints, per case, the largest |difference| of any parameter entry after 20 steps with the
same gradients (lr 0.02, momentum 0.95, Nesterov, weight decay 0.1).
"""

from __future__ import annotations

import contextlib

import torch

from optimizers import Muon
from tests.test_muon import torch_muon_in_fp32  # the tests' fp32 redirect, one copy


def max_diff(shapes: list[tuple[int, int]], ns_dtype: str, torch_fp32: bool,
             batch_shapes: bool = True, steps: int = 20) -> float:
    """Largest |ours - torch| over all entries after ``steps`` steps."""
    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt = Muon(ours, lr=0.02, momentum=0.95, weight_decay=0.1, ns_dtype=ns_dtype,
               batch_shapes=batch_shapes)
    ropt = torch.optim.Muon(ref, lr=0.02, momentum=0.95, weight_decay=0.1)
    for _ in range(steps):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        with torch_muon_in_fp32() if torch_fp32 else contextlib.nullcontext():
            ropt.step()
    return max((p - q).abs().max().item() for p, q in zip(ours, ref))


CASES = [
    ("distinct shapes, fp32 both", [(32, 64), (64, 16), (20, 20)], "float32", True, True),
    ("wide shapes batched, fp32 both", [(32, 64)] * 4, "float32", True, True),
    ("tall shapes batched, fp32 both", [(64, 32)] * 4, "float32", True, True),
    ("tall shapes, batch_shapes=False, fp32", [(64, 32)] * 4, "float32", True, False),
    ("distinct shapes, bf16 both", [(32, 64), (64, 16), (20, 20)], "bfloat16", False, True),
    ("tall shapes batched, bf16 both", [(64, 32)] * 4, "bfloat16", False, True),
    ("ns_dtype='auto' (fp32 on CPU) vs torch's bf16", [(32, 64), (64, 16)], "auto", False,
     True),
]


def main() -> None:
    torch.set_num_threads(1)
    for name, shapes, ns_dtype, torch_fp32, batch in CASES:
        print(f"{name:48s} {max_diff(shapes, ns_dtype, torch_fp32, batch):.3g}")


if __name__ == "__main__":
    main()
