"""PyTorch Lightning: a callback that attaches a probe to every optimizer of the Trainer, writes
into the Trainer's log folder and logs each training batch's loss. Lightning is an optional
extra (``pip install lightning``); importing this module without it raises ImportError."""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    import lightning as L
except ImportError:  # the older package name
    import pytorch_lightning as L  # noqa: N812

import probe


class ProbeCallback(L.Callback):
    """``trainer = Trainer(callbacks=[ProbeCallback(every=10)])``: at the start of training a
    probe is attached to each of ``trainer.optimizers`` (``attach_kwargs`` go to
    ``probe.attach``), writing into ``<logdir>/optprobe`` (``<logdir>/optprobe/opt<i>`` when
    there are several optimizers); ``logdir`` defaults to the Trainer's ``log_dir``, else its
    ``default_root_dir``. Each batch's loss is logged as ``train/loss``; the probes close when
    training ends or raises. Automatic optimization's closures and gradient accumulation are
    handled by the probe itself (it checks gradients after the closure's first call)."""

    def __init__(self, logdir: str | os.PathLike | None = None, **attach_kwargs: Any) -> None:
        for bad in ("model", "logdir"):
            if bad in attach_kwargs:
                raise ValueError(f"{bad}= is set by the callback (the LightningModule and "
                                 f"the Trainer's log folder); pass logdir= to ProbeCallback")
        if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
            raise ValueError(f"logdir must be a path or None, got {logdir!r}")
        self.logdir = logdir
        self.attach_kwargs = attach_kwargs
        self.probes: list[probe.Probe] = []

    def _folder(self, trainer) -> str:
        root = self.logdir or trainer.log_dir or trainer.default_root_dir
        return os.path.join(os.fspath(root), "optprobe")

    def on_train_start(self, trainer, pl_module) -> None:
        self._close()
        optimizers = list(trainer.optimizers)
        folder = self._folder(trainer)
        try:
            for i, opt in enumerate(optimizers):
                where = folder if len(optimizers) == 1 else os.path.join(folder, f"opt{i}")
                self.probes.append(probe.attach(opt, model=pl_module, logdir=where,
                                                **self.attach_kwargs))
        except BaseException:
            self._close()  # all of them or none
            raise

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            for p in self.probes:
                p.log("train/loss", loss.detach())

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        probes, self.probes = self.probes, []
        for p in probes:
            p.close()
