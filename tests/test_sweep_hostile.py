"""Issue 18: a property-based sweep of every optimizer over hostile gradients, shapes and dtypes.

Each case builds the same parameters (or model) and optimizer twice from one seed: once bare
(its bus has no subscriber, no probe) and once under ``probe.attach(every=1,
on_nonfinite="report")`` with a Recorder. Both take the same gradients, drawn from hostile
sets: a NaN/Inf entry, all NaN, all zeros (a rank-0 matrix), 1e30 and 1e-30 scales,
denormals (1e-40: subnormal in float32 and bfloat16), rank-1 matrices, on float16, bfloat16,
float32 and float64 parameters of shapes 1x1, 1xN, Nx1, 0-size, 0-d, vectors and 1x1/7x7 conv
kernels. K-FAC needs its module hooks, so it runs real forward/backward passes on small
models (a batch of one included) and is poisoned through the loss scale, the input, an
output-gradient hook or the parameter gradients after backward.

Properties checked after every step:

- ``step()`` raises nothing;
- telemetry on equals telemetry off bit for bit: parameters, gradients and optimizer state
  (NaN payloads and signed zeros included, so NaN == NaN here);
- no NaN in the telemetered weights that the bare run does not have too;
- a parameter whose gradients were finite in every step so far stays finite (K-FAC: every
  gradient of the model, since its KL clip couples the layers);
- a non-finite gradient is reported: ``anomaly/nonfinite`` names the parameter at its step.

``OPTPROBE_SWEEP_EXAMPLES`` sets the examples per optimizer (default 1000); the cases tried
are counted per optimizer and printed at the end of the module (``-s`` shows them), and
written as JSON to ``$OPTPROBE_SWEEP_COUNTS`` when that is set.
"""

from __future__ import annotations

import json
import math
import os
import sys
import zlib
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from torch import nn

import hooks
import optimizers
import probe
from tests.helpers import Recorder

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

EXAMPLES = int(os.environ.get("OPTPROBE_SWEEP_EXAMPLES", "1000"))
# deterministic: a fixed seed per optimizer (different cases for each), no example database
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (1, 7), (7, 1), (0, 4), (4, 0), (0,), (), (5,), (6, 5), (5, 6),
          (4, 3, 1, 1), (4, 3, 7, 7), (3, 2, 3, 3), (0, 3, 3, 3), (2, 1, 7, 7)]
KINDS = ["normal", "nan", "inf", "-inf", "all_nan", "zeros", "huge", "tiny", "denormal",
         "rank1", "huge_rank1", "tiny_rank1", "large", "near_max"]
SCALES = {"huge": 1e30, "tiny": 1e-30, "denormal": 1e-40, "huge_rank1": 1e30,
          "tiny_rank1": 1e-30, "large": 3e3}

CASES: Counter = Counter()  # cases tried, per optimizer
NONFINITE: Counter = Counter()  # of which with a non-finite gradient
EXEMPT: Counter = Counter()  # of which a known limit left the finite-weight check out


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    line = ", ".join(f"{k}: {v} ({NONFINITE[k]} with a non-finite gradient, {EXEMPT[k]} "
                     f"without the finite-weight check)" for k, v in sorted(CASES.items()))
    print(f"\nhostile sweep: {sum(CASES.values())} cases tried; {line}", file=sys.stderr)
    path = os.environ.get("OPTPROBE_SWEEP_COUNTS")
    if path:
        with open(path, "w") as f:
            json.dump({"cases": dict(CASES), "nonfinite": dict(NONFINITE),
                       "finite_check_left_out": dict(EXEMPT)}, f, indent=1)


# -- hostile values ----------------------------------------------------------------------------

def hostile(kind: str, shape: tuple, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A gradient of ``kind`` for a parameter of ``shape``, made in float64, cast to ``dtype``
    (1e30 becomes inf in float16, 1e-40 zero: the cast value is what the step sees);
    "large" (3e3) is finite in float16 but its sums are not; "near_max" is 3/4 of the
    dtype's largest value."""
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    n = base.numel()
    if kind in ("rank1", "huge_rank1", "tiny_rank1") and len(shape) >= 2 and n:
        rows = shape[0]
        u = torch.randn(rows, 1, generator=gen, dtype=torch.float64)
        v = torch.randn(1, n // rows, generator=gen, dtype=torch.float64)
        base = (u @ v).reshape(shape)
    if kind == "zeros":
        base = torch.zeros(shape, dtype=torch.float64)
    elif kind == "all_nan":
        base = torch.full(shape, math.nan, dtype=torch.float64)
    elif kind in ("nan", "inf", "-inf") and n:
        i = int(torch.randint(n, (1,), generator=gen))
        base.view(-1)[i] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[kind]
    base = base * SCALES.get(kind, 1.0)
    if kind == "near_max":  # finite, but any sum of two entries overflows the dtype
        base = torch.where(base < 0, -1.0, 1.0) * torch.finfo(dtype).max * 0.75
    return base.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(t.numel(), dtype=t.dtype)  # a fresh dense copy: any strides in
    flat.copy_(t.detach().reshape(-1))
    return flat.view(torch.uint8) if flat.is_floating_point() else flat


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit: NaN equals NaN (with its payload), -0.0 differs from 0.0."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _assert_same_state(sa: dict, sb: dict, where: str) -> None:
    assert sa.keys() == sb.keys(), where
    for k in sa:
        va, vb = sa[k], sb[k]
        if isinstance(va, dict):
            _assert_same_state(va, vb, f"{where}.{k}")
        elif isinstance(va, torch.Tensor):
            assert isinstance(vb, torch.Tensor) and same(va, vb), f"{where}.{k}"
        elif isinstance(va, float) and math.isnan(va):
            assert isinstance(vb, float) and math.isnan(vb), f"{where}.{k}"
        elif isinstance(va, (list, tuple)) and va and isinstance(va[0], torch.Tensor):
            assert len(va) == len(vb) and all(same(x, y) for x, y in zip(va, vb)), \
                f"{where}.{k}"
        else:
            assert va == vb, f"{where}.{k}"


def _opt_state(opt: torch.optim.Optimizer) -> dict:
    sd = opt.state_dict()
    sd.pop("optprobe", None)
    sd.pop("param_groups", None)
    return sd


def _reported(rec: Recorder, step: int) -> set[str]:
    """The parameters ``anomaly/nonfinite`` named at ``step``."""
    return {e.tags["param"] for e in rec.events if e.topic == "anomaly/nonfinite"
            and e.step == step and e.tags.get("param") is not None and e.value == 1.0}


# -- parameter-level optimizers (gradients set directly) ----------------------------------------

class Holder(nn.Module):
    """Parameters p0, p1, ... under their names, for the probe's tags."""

    def __init__(self, shapes: list[tuple], dtype: torch.dtype, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for i, sh in enumerate(shapes):
            w = torch.randn(sh, generator=g, dtype=torch.float64).to(dtype)
            self.register_parameter(f"p{i}", nn.Parameter(w))


def _muon(m: Holder, bus: hooks.Bus, opts: dict) -> torch.optim.Optimizer:
    named = list(m.named_parameters())
    params: list = named
    if opts["use_muon"]:  # every matrix (2-D, 4-D, 0-size too) marked for Newton-Schulz
        mats = [(n, p) for n, p in named if p.ndim in (2, 4)]
        rest = [(n, p) for n, p in named if p.ndim not in (2, 4)]
        params = [g for g in ({"params": mats, "use_muon": True}, {"params": rest})
                  if g["params"]]
    return optimizers.Muon(params, lr=0.02, weight_decay=0.01, min_dim=opts["min_dim"],
                           max_aspect=math.inf, bus=bus)


def _falcon(backend: str):
    def make(m: Holder, bus: hooks.Bus, opts: dict) -> torch.optim.Optimizer:
        return optimizers.Falcon(list(m.named_parameters()), lr=1e-2, backend=backend,
                                 rank_k=opts["rank_k"], mask_interval=2, total_steps=4,
                                 min_kernel=opts["min_kernel"], bus=bus)
    return make


def _block_schedule(m: Holder, bus: hooks.Bus, opts: dict) -> torch.optim.Optimizer:
    ps = list(m.parameters())
    inner = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)
    return optimizers.BlockSchedule(inner, [nn.ParameterList([p]) for p in ps],
                                    threshold=0.6, probe_every=2, total_steps=6, bus=bus)


def _adamw(m: Holder, bus: hooks.Bus, opts: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(m.named_parameters()), lr=1e-2, weight_decay=0.1)


PARAM_OPTIMIZERS = {
    "Muon": _muon,
    "Falcon(svd)": _falcon("svd"),
    "Falcon(poweriter)": _falcon("poweriter"),
    "BlockSchedule(AdamW)": _block_schedule,
    "AdamW": _adamw,
}


@st.composite
def param_cases(draw):
    shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4))
    steps = draw(st.integers(2, 3))
    kinds = [draw(st.lists(st.sampled_from(KINDS), min_size=len(shapes), max_size=len(shapes)))
             for _ in range(steps)]
    return {
        "dtype": draw(st.sampled_from(DTYPES)),
        "shapes": shapes,
        "kinds": kinds,
        "seed": draw(st.integers(0, 2**16)),
        "opts": {"min_dim": draw(st.sampled_from([1, 2])),
                 "rank_k": draw(st.sampled_from([1, 2])),
                 "min_kernel": draw(st.sampled_from([1, 3])),
                 "use_muon": draw(st.booleans())},
    }


def _param_run(name: str, case: dict, probed: bool):
    """Build and step one optimizer over the case's gradients; per step: params, grads and
    state after the step, plus the Recorder and which gradients were non-finite."""
    model = Holder(case["shapes"], case["dtype"], case["seed"])
    bus = hooks.Bus()
    opt = PARAM_OPTIMIZERS[name](model, bus, case["opts"])
    rec = Recorder()
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    p = probe.attach(opt, model=model, every=1, collectors=[rec], on_nonfinite="report",
                     bus=getattr(opt, "bus", None)) if probed else None
    trace = []
    try:
        g = torch.Generator().manual_seed(case["seed"] + 1)
        for kinds in case["kinds"]:
            grads = [hostile(k, tuple(t.shape), t.dtype, g) for k, t in zip(kinds, params)]
            for t, gr in zip(params, grads):
                t.grad = gr.clone()
            bad = [n for n, gr in zip(names, grads) if not bool(torch.isfinite(gr).all())]
            opt.step()
            trace.append(([t.detach().clone() for t in params],
                          [None if t.grad is None else t.grad.clone() for t in params],
                          _opt_state(opt), bad))
    finally:
        if p is not None:
            p.close()
    return names, trace, rec


def _finite_expected(name: str, case: dict, i: int, step: int) -> bool:
    """Whether parameter ``i`` must stay finite after ``step`` when its gradients were finite.

    Two known limits, not defects of this project (docs/resilience.md, "Hostile-input
    sweep"): torch.optim.AdamW's own float16 arithmetic (eps=1e-8 is 0 in float16, so a zero
    or underflowing gradient gives m / 0), which BlockSchedule(AdamW) runs unchanged; and
    Falcon on a gradient within ~taps of the dtype's largest value, whose filtered gradient
    (not bounded by max |g|) can overflow to inf before AdamW sees it.
    """
    if name in ("AdamW", "BlockSchedule(AdamW)") and case["dtype"] == torch.float16:
        return False
    if name.startswith("Falcon") and any(k[i] == "near_max" for k in case["kinds"][:step + 1]):
        return False
    return True


def check_param_case(name: str, case: dict) -> None:
    CASES[name] += 1
    names, bare, _ = _param_run(name, case, probed=False)
    _, ours, rec = _param_run(name, case, probed=True)
    if any(b for *_, b in bare):
        NONFINITE[name] += 1
    if not all(_finite_expected(name, case, i, len(case["kinds"]) - 1)
               for i in range(len(names))):
        EXEMPT[name] += 1
    ever_bad: set[str] = set()
    for step, ((pb, gb, sb, bad), (po, go, so, _)) in enumerate(zip(bare, ours)):
        ever_bad.update(bad)
        for i, (n, a, b) in enumerate(zip(names, pb, po)):
            assert same(a, b), f"{name} step {step}: {n} differs with telemetry on"
            assert not (torch.isnan(b) & ~torch.isnan(a)).any(), f"{name}: NaN from telemetry"
            if n not in ever_bad and _finite_expected(name, case, i, step):
                assert torch.isfinite(b).all(), \
                    f"{name} step {step}: {n} {tuple(b.shape)} {b.dtype} got a non-finite " \
                    f"weight from finite gradients"
        for n, a, b in zip(names, gb, go):
            assert (a is None) == (b is None) and (a is None or same(a, b)), \
                f"{name} step {step}: the gradient of {n} changed under telemetry"
        _assert_same_state(sb, so, f"{name} step {step} state")
        assert _reported(rec, step) == set(bad), \
            f"{name} step {step}: anomaly/nonfinite named {sorted(_reported(rec, step))}, " \
            f"the non-finite gradients are {bad}"


@pytest.mark.parametrize("name", sorted(PARAM_OPTIMIZERS))
def test_hostile_sweep(name):
    @seed(zlib.crc32(name.encode()))
    @SETTINGS
    @given(case=param_cases())
    def sweep(case):
        check_param_case(name, case)

    sweep()


# -- K-FAC: real forward/backward, poisoned through the loss, the input or a hook --------------

class WithEmpty(nn.Module):
    """An MLP beside a zero-size layer (pruned away: K-FAC leaves it out)."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        self.empty = nn.Linear(6, 0)

    def forward(self, x):
        return self.main(x) + self.empty(x).sum()


MODELS = {  # name -> (model factory, input shape without the batch)
    "linear_1x1": (lambda: nn.Sequential(nn.Linear(1, 1)), (1,)),
    "linear_1xN": (lambda: nn.Sequential(nn.Linear(7, 1)), (7,)),
    "linear_Nx1": (lambda: nn.Sequential(nn.Linear(1, 7)), (1,)),
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)), (6,)),
    "with_empty": (WithEmpty, (6,)),
    "conv1x1": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.Tanh(), nn.Flatten(),
                                      nn.Linear(4 * 3 * 3, 2)), (3, 3, 3)),
    "conv7x7": (lambda: nn.Sequential(nn.Conv2d(2, 3, 7), nn.Flatten(), nn.Linear(3, 2)),
                (2, 7, 7)),
}
KFAC_POISONS = ["none", "loss_zero", "loss_huge", "loss_tiny", "loss_denormal", "loss_nan",
                "loss_inf", "input_nan", "input_inf", "input_huge", "outgrad_nan",
                "outgrad_zero", "outgrad_huge", "grad_nan", "grad_inf", "grad_zero"]
_LOSS_SCALE = {"loss_zero": 0.0, "loss_huge": 1e30, "loss_tiny": 1e-30,
               "loss_denormal": 1e-40, "loss_nan": math.nan, "loss_inf": math.inf}

# K-FAC defects the sweep found, fixed (range-safe G sums and KL clip, optimizers/kfac.py):
# 1. Woodbury: a finite gradient at 1e30 (the loss or an output gradient scaled by 1e30) in
#    float32/bfloat16 under policy "woodbury" (or "auto" when it picks it) wrote NaN into the
#    weights at its first step: (U * U).sum() and the T x T Gram overflowed float32.
# 2. KL clip: once an inverse existed (eig policy), the same gradient made sum <NG, grad>
#    overflow float32 to NaN, and so every layer's step.
# Both stay as direct tests below, and the sweep checks finite weights on every case.


@st.composite
def kfac_cases(draw):
    steps = draw(st.integers(2, 3))
    return {
        "model": draw(st.sampled_from(sorted(MODELS))),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16,
                                       torch.float16])),
        "batch": draw(st.sampled_from([1, 1, 4])),
        "policy": draw(st.sampled_from(["eig", "woodbury", "auto"])),
        "inverse_every": draw(st.sampled_from([1, 2])),
        "poisons": [draw(st.sampled_from(KFAC_POISONS)) for _ in range(steps)],
        "seed": draw(st.integers(0, 2**16)),
    }


def _kfac_run(case: dict, probed: bool):
    torch.manual_seed(case["seed"])
    factory, in_shape = MODELS[case["model"]]
    model = factory().to(case["dtype"])
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    poison = {"kind": "none"}

    def outgrad(module, inputs, output):  # registered before K-FAC's: it sees the result
        kind = poison["kind"]
        if kind.startswith("outgrad") and output.requires_grad:
            def hook(g):
                g = g.clone()
                if kind == "outgrad_nan":
                    g.view(-1)[0] = math.nan
                elif kind == "outgrad_zero":
                    g.zero_()
                else:
                    g.mul_(1e30)
                return g
            output.register_hook(hook)

    first.register_forward_hook(outgrad)
    bus = hooks.Bus()
    opt = optimizers.KFAC(model, lr=0.05, factor_every=1, inverse_every=case["inverse_every"],
                          policy=case["policy"], bus=bus)
    rec = Recorder()
    named = list(model.named_parameters())
    p = probe.attach(opt, model=model, every=1, collectors=[rec], on_nonfinite="report",
                     bus=bus) if probed else None
    trace = []
    try:
        g = torch.Generator().manual_seed(case["seed"] + 1)
        for kind in case["poisons"]:
            poison["kind"] = kind
            x = torch.randn(case["batch"], *in_shape, generator=g, dtype=torch.float64)
            if kind.startswith("input"):
                x.view(-1)[0] = {"input_nan": math.nan, "input_inf": math.inf,
                                 "input_huge": 1e30}[kind]
            x = x.to(case["dtype"])
            y = model(x)
            loss = y.float().square().mean() * _LOSS_SCALE.get(kind, 1.0)
            loss.backward()
            if kind.startswith("grad_"):
                gw = first.weight.grad
                if kind == "grad_zero":
                    gw.zero_()
                else:
                    gw.view(-1)[0] = math.nan if kind == "grad_nan" else math.inf
            bad = [n for n, t in named if t.grad is not None
                   and not bool(torch.isfinite(t.grad).all())]
            opt.step()
            trace.append(([t.detach().clone() for _, t in named],
                          [None if t.grad is None else t.grad.clone() for _, t in named],
                          _opt_state(opt), bad))
            opt.zero_grad()
    finally:
        if p is not None:
            p.close()
        opt.remove_hooks()
    return [n for n, _ in named], trace, rec


def check_kfac_case(case: dict, label: str = "KFAC") -> None:
    CASES[label] += 1
    names, bare, _ = _kfac_run(case, probed=False)
    _, ours, rec = _kfac_run(case, probed=True)
    if any(b for *_, b in bare):
        NONFINITE[label] += 1
    clean = True
    for step, ((pb, gb, sb, bad), (po, go, so, _)) in enumerate(zip(bare, ours)):
        clean = clean and not bad
        for n, a, b in zip(names, pb, po):
            assert same(a, b), f"KFAC step {step}: {n} differs with telemetry on"
            assert not (torch.isnan(b) & ~torch.isnan(a)).any(), "KFAC: NaN from telemetry"
            if clean:
                assert torch.isfinite(b).all(), \
                    f"KFAC step {step}: {n} got a non-finite weight from finite gradients"
        for n, a, b in zip(names, gb, go):
            assert (a is None) == (b is None) and (a is None or same(a, b)), \
                f"KFAC step {step}: the gradient of {n} changed under telemetry"
        _assert_same_state(sb, so, f"KFAC step {step} state")
        assert _reported(rec, step) == set(bad), \
            f"KFAC step {step}: anomaly/nonfinite named {sorted(_reported(rec, step))}, " \
            f"the non-finite gradients are {bad}"


def test_hostile_sweep_kfac():
    @seed(zlib.crc32(b"KFAC"))
    @SETTINGS
    @given(case=kfac_cases())
    def sweep(case):
        check_kfac_case(case)

    sweep()


def _kfac_huge(model, dtype, policy, poisons):
    check_kfac_case({"model": model, "dtype": dtype, "batch": 4, "policy": policy,
                     "inverse_every": 1, "poisons": poisons, "seed": 1}, "KFAC huge")


@pytest.mark.parametrize("model,dtype,policy,poison", [
    ("mlp", torch.float32, "woodbury", "loss_huge"),
    ("mlp", torch.bfloat16, "woodbury", "outgrad_huge"),
    ("linear_Nx1", torch.float32, "auto", "loss_huge"),
    ("conv7x7", torch.float32, "woodbury", "outgrad_huge"),
    ("conv1x1", torch.bfloat16, "woodbury", "loss_huge"),
])
def test_kfac_huge_gradient_under_woodbury_keeps_weights_finite(model, dtype, policy, poison):
    """Was K-FAC defect 1: a finite 1e30 gradient wrote NaN through the Woodbury inverse."""
    _kfac_huge(model, dtype, policy, [poison, "none"])


@pytest.mark.parametrize("model,dtype,poison", [
    ("mlp", torch.float32, "loss_huge"),
    ("with_empty", torch.bfloat16, "outgrad_huge"),
    ("linear_1xN", torch.float32, "loss_huge"),
    ("conv1x1", torch.float32, "outgrad_huge"),
])
def test_kfac_huge_gradient_keeps_the_kl_clip_finite(model, dtype, poison):
    """Was K-FAC defect 2: the KL clip's sum <NG, grad> overflowed to NaN."""
    _kfac_huge(model, dtype, "eig", ["none", poison, "none"])


# -- the defects the sweep found, fixed: one direct test each -----------------------------------

@pytest.mark.parametrize("size", [3, 40])  # torch's scalar and vectorized loops differ
@pytest.mark.parametrize("dtype,nan_bits", [(torch.bfloat16, -1), (torch.bfloat16, 0x7F81),
                                            (torch.float16, 0x7C01), (torch.float16, -0x201)])
def test_finiteness_check_keeps_half_precision_nan_bits(dtype, nan_bits, size):
    # before: torch's AMP check (x * 1.0 in place, through float) quieted or canonicalized a
    # float16/bfloat16 NaN, so a probed run's gradients differed in bits from a bare run's
    from probe.stats import FiniteCheck
    g = torch.randn(size).to(dtype)
    g.view(torch.int16)[1] = nan_bits  # a signaling NaN, or one with sign and payload
    grads = [g, torch.randn(5), torch.randn(3).to(dtype)]
    before = [x.clone() for x in grads]
    assert FiniteCheck().mask(grads) == [True, False, False]
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(grads, before))


def test_finite_gradient_whose_sum_overflows_is_not_named():
    # before: sum |g| overflowed (float16 from 65504, any dtype near its largest value) and a
    # finite gradient was named in anomaly/nonfinite next to the real culprit
    from probe.stats import FiniteCheck, abs_sums, step_norms
    large16 = torch.full((600,), 3000.0, dtype=torch.float16)
    near_max = torch.full((4,), torch.finfo(torch.float32).max * 0.75)
    bad = torch.tensor([1.0, math.inf])
    assert torch.isfinite(abs_sums([large16])).all()
    assert FiniteCheck().mask([large16, near_max, bad]) == [False, False, True]
    assert FiniteCheck().mask([large16, near_max]) == [False, False]
    # the sampled step's path: the gradient norms stand for the sums (near_max's overflows)
    grads = [large16, near_max, bad]
    norms = step_norms([g.clone() for g in grads], [torch.zeros_like(g) for g in grads], grads)
    assert FiniteCheck().mask(grads, norms[0]) == [False, False, True]


@pytest.mark.parametrize("backend", ["svd", "poweriter"])
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e30), (torch.float32, 1e-30),
                                         (torch.float32, 1e-39), (torch.bfloat16, 1e30),
                                         (torch.bfloat16, 1e-30)])
def test_falcon_filter_of_a_huge_or_tiny_gradient_is_the_unit_filter_scaled(backend, dtype,
                                                                            scale):
    # before: the bin energies overflowed (1e30) or underflowed (1e-30) float32, so the mask
    # kept the wrong bins or all of them, and svd went NaN near the float range
    from optimizers.falcon import filter_grad
    g = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    small = (g * scale).to(dtype)
    unit = small.double() / scale  # the values the scaled gradient holds, at unit scale
    ref = filter_grad(unit.float(), 0.8, rank_k=2, backend=backend, stats=True)
    got = filter_grad(small, 0.8, rank_k=2, backend=backend, stats=True)
    assert torch.equal(got.mask, ref.mask)
    err = (got.grad.double() / scale - ref.grad.double()).abs().max() / ref.grad.abs().max()
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4), err
    for k in ("retained_energy", "cos_raw_filtered"):  # the statistics are ratios
        torch.testing.assert_close(got.stats[k].double(), ref.stats[k].double(), rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("backend", ["svd", "poweriter"])
def test_falcon_filter_near_the_float_range_stays_finite(backend):
    from optimizers.falcon import filter_grad
    sign = torch.where(torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(0)) < 0,
                       -1.0, 1.0)
    g = sign * torch.finfo(torch.float32).max * 0.75
    res = filter_grad(g, 0.9, rank_k=1, backend=backend, stats=True)
    assert torch.isfinite(res.grad).all() and not res.svd_failed
    assert all(math.isfinite(float(v)) for v in res.stats.values())


def _steps(opt, params, grads):
    for row in grads:
        for p, g in zip(params, row):
            p.grad = g.clone()
        opt.step()


def test_adamw_copies_keep_float16_weights_finite_and_match_torch_elsewhere():
    # before: eps=1e-8 is 0 in float16, so a zero gradient gave 0 / 0 = NaN weights (Falcon's
    # and Muon's fallback AdamW, as torch.optim.AdamW itself still does)
    def run(make, grads):
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(5, 4).half()), nn.Parameter(torch.randn(4).half())]
        _steps(make(ps), ps, grads)
        return ps

    gen = torch.Generator().manual_seed(1)
    normal = [[torch.randn(5, 4, generator=gen).half(), torch.randn(4, generator=gen).half()]
              for _ in range(3)]
    zero = [[torch.zeros(5, 4).half(), torch.zeros(4).half()]] * 2
    falcon = lambda ps: optimizers.Falcon(ps, lr=1e-2, weight_decay=0.0, bus=hooks.Bus())  # noqa: E731
    adamw = lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0)  # noqa: E731
    # where torch's float16 AdamW stays finite, Falcon (no conv weight: plain AdamW) is it
    for a, b in zip(run(falcon, normal), run(adamw, normal)):
        assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in run(falcon, zero))
    assert not all(torch.isfinite(p).all() for p in run(adamw, zero))  # torch's own arithmetic
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(6, 6).half()), nn.Parameter(torch.randn(6).half())
    muon = optimizers.Muon([w, b], bus=hooks.Bus())  # b goes to the AdamW fallback
    _steps(muon, [w, b], [[torch.zeros(6, 6).half(), torch.zeros(6).half()]] * 2)
    assert torch.isfinite(b).all() and torch.isfinite(w).all()


def test_falcon_eps_zero_and_a_zero_gradient_keep_weights_finite():
    w = nn.Parameter(torch.randn(3, 2, 3, 3))
    opt = optimizers.Falcon([w], eps=0.0, bus=hooks.Bus())
    _steps(opt, [w], [[torch.zeros(3, 2, 3, 3)]] * 2)
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0, 3, 3, 3)])
def test_muon_zero_size_matrix_marked_use_muon_goes_to_the_fallback(shape):
    # before: step() divided by zero (rows // cols and the shape-adjusted lr)
    p, q = nn.Parameter(torch.zeros(shape)), nn.Parameter(torch.randn(4, 4))
    opt = optimizers.Muon([{"params": [p, q], "use_muon": True}], bus=hooks.Bus())
    assert [r.route for r in opt.routes] == ["adamw", "muon"]
    _steps(opt, [p, q], [[torch.zeros(shape), torch.randn(4, 4)]] * 2)
    assert torch.isfinite(q).all()
