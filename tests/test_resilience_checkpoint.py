"""Checkpoints: the probe's step counter and aggregates travel in the optimizer's state_dict."""

import io

import pytest
import torch
from torch import nn

import hooks
import probe
from dashboards import read_events
from tests.helpers import Recorder


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def _train(model, opt, steps, start, p=None):
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(s)
        loss = model(torch.randn(8, 4, generator=g)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if p is not None:
            p.log("train/loss", float(s))


def test_resumed_run_continues_the_tensorboard_series_without_gap_or_repeat(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    with probe.attach(opt, model=model, logdir=run, every=1, histograms=False,
                      bus=hooks.Bus()) as p:
        _train(model, opt, 10, 0, p)
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        first_summary = p.summary()

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["opt"]["optprobe"]["step"] == 10
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    with probe.attach(opt, model=model, logdir=run, every=1, histograms=False,
                      bus=hooks.Bus()) as p:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        assert "optprobe" in ckpt["opt"]  # the caller's dict is left whole
        assert p.summary() == first_summary
        _train(model, opt, 10, 10, p)
    total = p.summary()

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in ("grad/norm", "grad/norm/0.weight", "step/time_ms"):
        assert [e.step for e in acc.Scalars(tag)] == list(range(20)), tag
    good, bad = read_events(run / "events.jsonl")
    assert not bad
    assert sorted(r["step"] for r in good if r["topic"] == "train/loss") == list(range(20))
    # the running aggregates went on from the checkpoint: 20 values, not 10
    assert total["grad/norm/0.weight"]["count"] == 20
    assert total["train/loss"]["count"] == 20
    assert total["train/loss"]["mean"] == pytest.approx(sum(range(20)) / 20)
    assert total["train/loss"]["min"] == 0.0 and total["train/loss"]["max"] == 19.0


def test_a_checkpoint_loads_into_a_plain_optimizer_and_a_plain_one_into_a_probed_one():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with probe.attach(opt, model=model, every=1, collectors=[Recorder()], bus=hooks.Bus()) as p:
        _train(model, opt, 3, 0)
        sd = opt.state_dict()
        plain = torch.optim.SGD(_model().parameters(), lr=0.1, momentum=0.9)
        plain.load_state_dict(sd)  # torch ignores the extra entry
        assert "optprobe" not in plain.state_dict()
        opt.load_state_dict(plain.state_dict())  # no probe entry: the counter stays
        assert p.step == 3
    assert "optprobe" not in opt.state_dict()  # closed: hooks gone


def test_a_corrupt_probe_entry_is_rejected_with_a_clear_error():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with probe.attach(opt, model=model, collectors=[Recorder()], bus=hooks.Bus()):
        sd = opt.state_dict()
        sd["optprobe"] = {"step": -3}
        with pytest.raises(ValueError, match="step"):
            opt.load_state_dict(sd)
        sd["optprobe"] = "not a dict"
        with pytest.raises(ValueError, match="optprobe"):
            opt.load_state_dict(sd)
