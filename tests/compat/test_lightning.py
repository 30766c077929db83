"""A lightning.Trainer run on CPU with automatic optimization, the probe attached to the
Trainer's optimizer by a callback. Automatic optimization always steps with a closure (zero
grad, training_step, backward run inside ``optimizer.step``); the gradient the optimizer
received is the one Lightning shows ``on_before_optimizer_step``, after the closure's backward
and before the update."""

import pytest
import torch

import probe
from tests.compat import harness as h

L = pytest.importorskip("lightning", reason="lightning is not installed (pip install "
                                            "'.[compat]')")

STEPS = 3


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = h.mlp()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x) - y).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


class ProbeCallback(L.Callback):
    """Attaches the probe when fit starts, keeps float64 references of each step."""

    def __init__(self) -> None:
        self.recorder = h.Recorder()
        self.probe = None
        self.refs: list[dict] = []
        self._pending = None

    def on_fit_start(self, trainer, pl_module):
        self.probe = probe.attach(trainer.optimizers[0], model=pl_module, every=1,
                                  collectors=[self.recorder])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        named = list(pl_module.named_parameters())
        self._pending = ({n: h.as_f64(p) for n, p in named}, h.grads_of(named))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        before, grads = self._pending
        after = {n: h.as_f64(p) for n, p in pl_module.named_parameters()}
        self.refs.append(h.reference(before, after, grads))

    def on_fit_end(self, trainer, pl_module):
        self.probe.close()


def _fit(tmp_path, callbacks) -> Net:
    torch.manual_seed(0)
    module = Net()
    data = [h.batch(s) for s in range(STEPS)]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat([x for x, _ in data]),
                                       torch.cat([y for _, y in data])),
        batch_size=16, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(module, loader)
    return module


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning")
    cb = ProbeCallback()
    plain = _fit(root / "plain", [])
    probed = _fit(root / "probed", [cb])
    return plain, probed, cb


def test_lightning_training_is_unchanged(fits):
    plain, probed, cb = fits
    h.assert_same_params(plain, probed)
    assert cb.probe.step == STEPS and len(cb.refs) == STEPS


def test_lightning_statistics(fits):
    _, _, cb = fits
    h.check_stats(cb.recorder, cb.refs)
