"""TensorBoard collector: scalars, histograms and text through torch's SummaryWriter, plus
the custom-scalar layout of the tags actually written and the run's hyperparameters."""

from __future__ import annotations

import os
import time

import numpy as np

from dashboards.layouts import build_layout
from hooks import Event, topics

_HPARAM_TYPES = (bool, int, float, str)
_METRICS = ("eval/accuracy", "eval/loss", "train/loss")


def _event_file(writer) -> str | None:
    # tensorboard's EventFileWriter keeps its path in a private attribute; absent, skip the check
    ev = getattr(writer._get_file_writer(), "event_writer", None)
    return getattr(ev, "_file_name", None)


def _read_out_of_order(path: str) -> bool:
    """True when TensorBoard, reading event files in name order, would read ``path`` before
    an older file of the same folder (``...<second>.<host>.<pid>.10`` sorts before ``.9``)."""
    folder, base = os.path.split(path)
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return any(n > base for n in names if n.startswith("events.out.tfevents.") and n != base)


def open_writer(logdir: str, **kwargs):
    """A SummaryWriter whose event file TensorBoard reads after the folder's earlier ones, so
    a resumed run's steps never come first (TensorBoard would purge the older steps)."""
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: keep it lazy

    writer = SummaryWriter(log_dir=logdir, **kwargs)
    path = _event_file(writer)
    if path and _read_out_of_order(path):  # rare: same second, counter gained a digit
        writer.close()
        os.remove(path)
        now = time.time()
        time.sleep(int(now) + 1 - now + 1e-3)  # the next second sorts after every older file
        writer = SummaryWriter(log_dir=logdir, **kwargs)
    return writer


def check_hparams(hparams: dict | None) -> dict | None:
    """``hparams`` unchanged if it maps str names to bool/int/float/str; else ValueError."""
    if hparams is None:
        return None
    if not isinstance(hparams, dict):
        raise ValueError(f"hparams must be a dict of str to bool/int/float/str or None, "
                         f"got {type(hparams).__name__}")
    for k, v in hparams.items():
        if not isinstance(k, str) or not isinstance(v, _HPARAM_TYPES):
            raise ValueError(f"hparams must map str names to bool/int/float/str values, "
                             f"got {k!r}: {v!r}")
    return dict(hparams)


class TensorBoard:
    """Writes each event under the tag ``<topic>/<param>`` (or ``<topic>``) in ``logdir``.

    Whenever a scalar tag appears that changes the custom-scalar layout, the layout is written
    again (TensorBoard shows the latest), so it always matches the tags in the file.
    ``hparams`` go to the HParams dashboard on close, with the run's losses/accuracy as metrics.
    """

    name = "TensorBoard"

    def __init__(self, logdir: str | os.PathLike, flush_secs: int = 10,
                 filename_suffix: str = "", hparams: dict | None = None) -> None:
        if not isinstance(flush_secs, int) or flush_secs < 1:
            raise ValueError(f"flush_secs must be an int >= 1, got {flush_secs!r}")
        self.hparams = check_hparams(hparams)
        self.logdir = os.fspath(logdir)
        self.writer = open_writer(self.logdir, flush_secs=flush_secs,
                                  filename_suffix=filename_suffix)
        self.scalar_tags: dict[str, set[str]] = {}
        self.layout: dict[str, dict[str, list]] = {}
        self._last_step = 0
        self._closed = False

    def handle(self, events: list[Event]) -> None:
        w = self.writer
        new_tag = False
        for e in events:
            self._last_step = max(self._last_step, e.step)
            tag = e.tag_path()
            if isinstance(e.value, str):
                w.add_text(tag, e.value, e.step, walltime=e.wall_time)
            elif isinstance(e.value, list):
                if e.value:
                    w.add_histogram(tag, np.asarray(e.value, dtype=np.float64), e.step,
                                    walltime=e.wall_time)
            else:
                row = topics.lookup(e.topic)
                if row is not None and row.kind == topics.HISTOGRAM:
                    w.add_histogram(tag, np.asarray([e.value]), e.step, walltime=e.wall_time)
                else:
                    w.add_scalar(tag, e.value, e.step, walltime=e.wall_time)
                    seen = self.scalar_tags.setdefault(e.topic, set())
                    if tag not in seen:
                        seen.add(tag)
                        new_tag = True
        if new_tag:
            self._write_layout()

    def _write_layout(self) -> None:
        layout = build_layout(self.scalar_tags)
        if layout and layout != self.layout:
            from torch.utils.tensorboard.summary import custom_scalars

            # the step keeps the layout records in order: TensorBoard reads the last one
            self.writer._get_file_writer().add_summary(custom_scalars(layout), self._last_step)
            self.layout = layout

    def _write_hparams(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        # written into this run (not a sub-run as add_hparams does) so the metrics are the
        # run's own scalar series
        metrics = {m: 0.0 for m in _METRICS if m in self.scalar_tags}
        fw = self.writer._get_file_writer()
        for s in hparams(self.hparams, metrics):
            fw.add_summary(s, self._last_step)

    def flush(self) -> None:
        """Push buffered events to disk."""
        self.writer.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.hparams:
            self._write_hparams()
        self.writer.close()
