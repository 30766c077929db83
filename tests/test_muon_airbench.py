"""Muon(normalize_weights=True) reproduces airbench94_muon's Muon on a conv + BatchNorm net.

``AirbenchMuon`` below is a transcription (written here, not imported) of the Muon class and
``zeropower_via_newtonschulz5`` of KellerJordan/cifar10-airbench's airbench94_muon.py: SGD-form
momentum ``buf = mu*buf + g``, Nesterov ``g + mu*buf``, the weight normalized to norm
sqrt(rows) *before* the update, 3 quintic NS steps on ``G.bfloat16() / (||G|| + eps)``. The
only liberty: ``ns_dtype`` replaces the hard-coded bf16 cast so fp32 can be compared too.

Our momentum is torch.optim.Muon's EMA form, (1 - mu) times AirBench's; Newton-Schulz divides
by the Frobenius norm, so the updates agree to rounding, not bit for bit.
"""

import torch
import torch.nn.functional as F
from torch import nn

from optimizers import Muon


def airbench_ns(G, steps=3, eps=1e-7, dtype=torch.bfloat16):
    assert len(G.shape) == 2
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.to(dtype)
    X /= (X.norm() + eps)
    if G.size(0) > G.size(1):
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(0) > G.size(1):
        X = X.T
    return X


class AirbenchMuon(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, momentum=0, nesterov=False, ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(g)
                g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.data.mul_(len(p.data) ** 0.5 / p.data.norm())
                update = airbench_ns(g.reshape(len(g), -1), dtype=self.ns_dtype).view(g.shape)
                p.data.add_(update, alpha=-lr)


class BatchNorm(nn.BatchNorm2d):
    """AirBench's: frozen scale, low statistics momentum."""

    def __init__(self, n):
        super().__init__(n, eps=1e-12, momentum=0.4)
        self.weight.requires_grad = False


def _net():
    torch.manual_seed(0)
    conv = lambda i, o: nn.Conv2d(i, o, 3, padding="same", bias=False)  # noqa: E731
    return nn.Sequential(conv(3, 8), nn.MaxPool2d(2), BatchNorm(8), nn.GELU(),
                         conv(8, 8), BatchNorm(8), nn.GELU(),
                         conv(8, 8), BatchNorm(8), nn.GELU(),  # same shape: batched with the last
                         nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 10, bias=False))


def _train(make_muon, steps=12):
    model = _net()
    filters = [p for p in model.parameters() if p.ndim == 4]
    rest = [p for p in model.parameters() if p.ndim != 4 and p.requires_grad]
    sgd = torch.optim.SGD(rest, lr=0.05, momentum=0.85, nesterov=True)
    muon = make_muon(filters)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        F.cross_entropy(model(x), y).backward()
        sgd.step()
        muon.step()
        model.zero_grad(set_to_none=True)
    return model


def _max_rel(a, b):
    return max(((p - q).norm() / q.norm()).item()
               for p, q in zip(a.parameters(), b.parameters()))


def test_normalize_weights_matches_airbench94_muon_over_12_steps_fp32():
    ref = _train(lambda ps: AirbenchMuon(ps, lr=0.24, momentum=0.6, nesterov=True,
                                         ns_dtype=torch.float32))
    ours = _train(lambda ps: Muon(ps, lr=0.24, momentum=0.6, nesterov=True, ns_steps=3,
                                  normalize_weights=True, ns_dtype="float32"))
    assert _max_rel(ours, ref) < 1e-4  # measured 1.8e-6
    # the other order is another optimizer on a BN net (measured 1.34 apart)
    after = _train(lambda ps: Muon(ps, lr=0.24, momentum=0.6, nesterov=True, ns_steps=3,
                                   normalize_weights="after", ns_dtype="float32"))
    assert _max_rel(after, ref) > 0.1


def test_normalize_weights_matches_airbench94_muon_in_bf16_one_step():
    # bf16 NS on this tiny net at lr 0.24 is chaotic: AirBench's own bf16 and fp32 runs are
    # 0.08 apart after 2 steps and 0.66 after 8, so bf16 is compared where rounding shows
    ref = _train(lambda ps: AirbenchMuon(ps, lr=0.24, momentum=0.6, nesterov=True), steps=1)
    ours = _train(lambda ps: Muon(ps, lr=0.24, momentum=0.6, nesterov=True, ns_steps=3,
                                  normalize_weights=True, ns_dtype="bfloat16"), steps=1)
    assert _max_rel(ours, ref) < 2e-2  # measured 6.2e-3, bf16's 2^-8 = 3.9e-3 per rounding
