"""TensorBoard collector: scalars, histograms and text through torch's SummaryWriter."""

from __future__ import annotations

import os

import numpy as np

from hooks import Event, topics


class TensorBoard:
    """Writes each event under the tag ``<topic>/<param>`` (or ``<topic>``) in ``logdir``."""

    name = "TensorBoard"

    def __init__(self, logdir: str | os.PathLike, flush_secs: int = 10,
                 filename_suffix: str = "") -> None:
        if not isinstance(flush_secs, int) or flush_secs < 1:
            raise ValueError(f"flush_secs must be an int >= 1, got {flush_secs!r}")
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: keep it lazy

        self.logdir = os.fspath(logdir)
        self.writer = SummaryWriter(log_dir=self.logdir, flush_secs=flush_secs,
                                    filename_suffix=filename_suffix)

    def handle(self, events: list[Event]) -> None:
        w = self.writer
        for e in events:
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

    def flush(self) -> None:
        """Push buffered events to disk."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
