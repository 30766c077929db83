"""probe.lightning.ProbeCallback on a real lightning.Trainer (CPU, a few steps): one probe per
optimizer in the Trainer's log folder, its steps the Trainer's optimizer steps, the losses
logged, everything released when training ends."""

import math

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning", reason="lightning not installed (the [compat] extra)")

from dashboards import read_events  # noqa: E402
from probe.lightning import ProbeCallback  # noqa: E402


class Regressor(L.LightningModule):
    def __init__(self, optimizers=1, nan_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.n_opt, self.nan_at = optimizers, nan_at
        if optimizers > 1:
            self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self.net(x) - y).square().mean()
        if self.n_opt > 1:  # manual optimization: one optimizer per layer
            for opt in self.optimizers():
                opt.zero_grad()
            self.manual_backward(loss)
            for opt in self.optimizers():
                opt.step()
        elif batch_idx == self.nan_at:
            loss = loss * math.nan
        return loss

    def configure_optimizers(self):
        if self.n_opt > 1:
            return [torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                    torch.optim.Adam(self.net[2].parameters(), lr=1e-2)]
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)),
                                       batch_size=8)


def _fit(tmp_path, module, accumulate=1, **kwargs):
    cb = ProbeCallback(every=1, **kwargs)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, default_root_dir=tmp_path,
                        callbacks=[cb], enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, logger=False,
                        accumulate_grad_batches=accumulate)
    trainer.fit(module, _loader())
    return trainer, cb


def test_one_optimizer_automatic_optimization(tmp_path):
    trainer, cb = _fit(tmp_path, Regressor())
    assert cb.probes == []  # closed at the end of training
    recs, bad = read_events(tmp_path / "optprobe" / "events.jsonl")
    assert not bad
    steps = {r["step"] for r in recs if r["topic"] == "step/time_ms"}
    assert steps == set(range(trainer.global_step)) and trainer.global_step == 6
    losses = [r for r in recs if r["topic"] == "train/loss"]
    assert len(losses) == 6
    # the closure's gradient, read after its first call: every step has update statistics
    ups = {r["step"] for r in recs if r["topic"] == "update/norm" and not r["tags"]}
    assert ups == steps


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    trainer, _ = _fit(tmp_path, Regressor(), accumulate=2)
    recs, _ = read_events(tmp_path / "optprobe" / "events.jsonl")
    assert {r["step"] for r in recs if r["topic"] == "step/time_ms"} == {0, 1, 2}
    assert trainer.global_step == 3


def test_two_optimizers_get_a_probe_and_a_folder_each(tmp_path):
    _fit(tmp_path, Regressor(optimizers=2))
    for i, first in enumerate(("net.0.weight", "net.2.weight")):
        recs, _ = read_events(tmp_path / "optprobe" / f"opt{i}" / "events.jsonl")
        params = {r["tags"].get("param") for r in recs if r["topic"] == "grad/norm"}
        assert first in params and len(params - {None}) == 2  # its own layer only


def test_skip_mode_passes_through(tmp_path):
    module = Regressor(nan_at=2)
    _, cb = _fit(tmp_path, module, on_nonfinite="skip")
    assert all(torch.isfinite(p).all() for p in module.parameters())
    recs, _ = read_events(tmp_path / "optprobe" / "events.jsonl")
    assert [r["step"] for r in recs if r["topic"] == "anomaly/skipped_step" and r["value"]] == [2]


def test_arguments_the_callback_sets_are_refused():
    with pytest.raises(ValueError, match="model= is set by the callback"):
        ProbeCallback(model=None)
