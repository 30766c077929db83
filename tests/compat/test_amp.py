"""torch.amp.GradScaler("cpu") with AdamW, fused and not, and a forced overflow step.

Non-fused, the scaler unscales the gradients in place and skips ``optimizer.step()`` on an
overflow; fused, it hands ``grad_scale``/``found_inf`` to ``step()``, which runs on the
still-scaled gradients and makes itself a no-op on an overflow. What the optimizer received is
the unscaled gradient either way (the references divide by the scale), and a skipped step is
no optimizer step either way (AdamW's own state step says so)."""

import dataclasses

import pytest
import torch

import probe
from tests.compat import harness as h

STEPS, OVERFLOW = 4, 1
RAN = [s for s in range(STEPS) if s != OVERFLOW]


def _run(fused: bool, probed: bool) -> dict:
    torch.manual_seed(0)
    model = h.mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    named = list(model.named_parameters())
    rec = h.Recorder()
    p = probe.attach(opt, model=model, every=1, collectors=[rec]) if probed else None
    refs, scales = [], []
    try:
        for s in range(STEPS):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = h.mse(model, h.batch(s))
            scaler.scale(loss.float()).backward()
            if s == OVERFLOW:
                model[0].weight.grad[0, 0] = float("inf")
            scale = float(scaler.get_scale())
            scales.append(scale)
            received = {n: g / scale for n, g in h.grads_of(named).items()}
            before = {n: h.as_f64(t) for n, t in named}
            scaler.step(opt)
            scaler.update()
            if s != OVERFLOW:
                refs.append(h.reference(before, {n: h.as_f64(t) for n, t in named}, received))
    finally:
        if p is not None:
            p.close()
    return {"model": model, "opt": opt, "probe": p, "rec": rec, "refs": refs,
            "scales": scales}


@pytest.fixture(scope="module")
def runs():
    return {(fused, probed): _run(fused, probed) for fused in (False, True)
            for probed in (False, True)}


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_gradscaler_training_is_unchanged(runs, fused):
    plain, probed = runs[(fused, False)], runs[(fused, True)]
    h.assert_same_params(plain["model"], probed["model"])
    assert probed["scales"] == plain["scales"] == [2.0 ** 10] * 2 + [2.0 ** 9] * 2


def _state_steps(opt) -> set:
    return {float(st["step"]) for st in opt.state.values()}


def test_gradscaler_overflow_is_no_optimizer_step_in_torch(runs):
    # the ground truth the probe should agree with: AdamW counts 3 steps, fused or not
    assert _state_steps(runs[(False, True)]["opt"]) == _state_steps(runs[(True, True)]["opt"]) \
        == {float(len(RAN))}


def test_gradscaler_step_counts_agree_fused_and_not(runs):
    counts = {fused: runs[(fused, True)]["probe"].step for fused in (False, True)}
    assert counts[True] == counts[False], counts


def _delivered_steps(run: dict) -> list[int]:
    got = h.probed_values(run["rec"])
    return sorted({s for s, topic, name in got if topic == "grad/norm" and name is None})


def _check_ran_steps(run: dict) -> None:
    """The probe's records of the steps that ran, in step order, each equal to its reference
    (the gradient unscaled). The overflow step may be delivered too (as the probe's own
    on_nonfinite="skip" delivers a skipped step) or not; it is not compared. Fused, the
    gradients are still scaled when step() starts (fused AdamW divides them in place): a probe
    reading them before the step must unscale them by ``grad_scale``."""
    seen = _delivered_steps(run)
    if len(seen) == STEPS:
        seen = [seen[i] for i in RAN]
    assert len(seen) == len(RAN), f"probe delivered statistics for steps {seen}, ran {RAN}"
    order = {s: i for i, s in enumerate(seen)}
    relabel = h.Recorder()
    relabel.events = [dataclasses.replace(e, step=order[e.step]) for e in run["rec"].events
                      if e.step in order]
    h.check_stats(relabel, run["refs"])


def test_gradscaler_statistics_foreach(runs):
    _check_ran_steps(runs[(False, True)])


def test_gradscaler_statistics_fused(runs):
    _check_ran_steps(runs[(True, True)])


def test_gradscaler_fused_and_not_deliver_the_same_steps(runs):
    assert _delivered_steps(runs[(True, True)]) == _delivered_steps(runs[(False, True)])
