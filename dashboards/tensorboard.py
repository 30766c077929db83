"""TensorBoard collector: scalars, histograms and text written as one Summary per step into
the event file of torch's SummaryWriter, plus the custom-scalar layout of the tags actually
written and the run's hyperparameters."""

from __future__ import annotations

import math
import os
import time

from dashboards.event_bytes import ScalarBlock, event_record, raw_writer
from dashboards.event_writer import GuardedWriter
from dashboards.histograms import bins, bins_of
from dashboards.hparams import check_hparams, hparams_summaries
from dashboards.layouts import LOG10_TOPICS, build_layout
from hooks import Event, Vector, topics

_METRICS = ("eval/accuracy", "eval/loss", "train/loss")


def _histogram(h: dict | None):
    """The HistogramProto of :func:`dashboards.histograms.bins`' buckets (None: none)."""
    from tensorboard.compat.proto.summary_pb2 import HistogramProto

    if h is None:
        return None
    return HistogramProto(min=h["min"], max=h["max"], num=h["num"], sum=h["sum"],
                          sum_squares=h["sum_squares"], bucket_limit=h["limits"],
                          bucket=h["counts"])


def _log_tags(topic: str, tags) -> list[str]:
    """The tags of the log10 twins of ``topic``'s ``tags``."""
    n = len(topic)
    return [f"{topic}_log10{t[n:]}" for t in tags]


class _TagSet:
    """A per-parameter Vector's TensorBoard tags (and log10 twins), with the templates of
    their scalar records made on first use."""

    def __init__(self, e: Vector) -> None:
        self.params = e.params
        self.paths = e.tag_paths()
        self.logs = _log_tags(e.topic, self.paths) if e.topic in LOG10_TOPICS else None
        self._blocks: list[ScalarBlock | None] = [None, None]

    def block(self) -> ScalarBlock:
        if self._blocks[0] is None:
            self._blocks[0] = ScalarBlock(self.paths)
        return self._blocks[0]

    def log_block(self) -> ScalarBlock:
        if self._blocks[1] is None:
            self._blocks[1] = ScalarBlock(self.logs)
        return self._blocks[1]


def _log10(v: float) -> float:
    return math.log10(v) if v > 0 and math.isfinite(v) else math.nan


def _text(tag: str, text: str):
    """A text Summary under ``tag`` itself (torch's ``summary.text`` appends
    ``/text_summary``), indented four spaces: TensorBoard renders text as Markdown, which
    would turn ``in*kh*kw`` into italics and drop table columns; a code block shows it as
    written, in a fixed-width font."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.text.plugin_data_pb2 import TextPluginData

    literal = "\n".join("    " + line for line in text.split("\n"))
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name="text", content=TextPluginData(version=0).SerializeToString()))
    tensor = TensorProto(dtype="DT_STRING", string_val=[literal.encode("utf-8")],
                         tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta, tensor=tensor)])


class TensorBoard:
    """Writes each value under the tag ``<topic>/<param>`` (or ``<topic>``) in ``logdir``.

    A batch becomes one Summary (one event-file record) per step, however many tags it
    holds: the writer's queue and lock are met once per step, not once per value.
    Histograms are 30 equal-width buckets over the finite values (NaN/Inf left out).
    Whenever a scalar tag appears that changes the custom-scalar layout, the layout is written
    again (TensorBoard shows the latest), so it always matches the tags in the file.
    ``hparams`` go to the HParams dashboard on close, with the run's losses/accuracy as metrics.
    """

    name = "TensorBoard"
    vectors = True

    def __init__(self, logdir: str | os.PathLike, flush_secs: int = 10,
                 filename_suffix: str = "", hparams: dict | None = None,
                 max_queue: int = 1024, retry_secs: float = 5.0) -> None:
        if not isinstance(flush_secs, int) or flush_secs < 1:
            raise ValueError(f"flush_secs must be an int >= 1, got {flush_secs!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an int >= 1, got {max_queue!r}")
        if isinstance(retry_secs, bool) or not isinstance(retry_secs, (int, float)) or \
                not 0 <= retry_secs < math.inf:
            raise ValueError(f"retry_secs must be a finite number >= 0, got {retry_secs!r}")
        self.hparams = check_hparams(hparams)
        self.logdir = os.fspath(logdir)
        # a deep queue: the writer thread drains it, the training side never waits on it
        self._out = GuardedWriter(self.logdir, retry_secs, flush_secs=flush_secs,
                                  max_queue=max_queue, filename_suffix=filename_suffix)
        self.scalar_tags: dict[str, set[str]] = {}
        # per (topic, params list) of a Vector: its tags, made and recorded once
        self._tag_sets: dict[tuple[str, int], _TagSet] = {}
        self.layout: dict[str, dict[str, list]] = {}
        self._last_step = 0
        self._closed = False

    @property
    def writer(self):
        """The SummaryWriter of the event file being written now."""
        return self._out.writer

    def handle(self, events: list[Event | Vector]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        # a fresh file after a failed write needs the layout again; while the folder takes
        # no writes this raises, and the bus counts the lost batch
        new_tag = self._out.check()
        if new_tag:
            self.layout = {}
        fw = self._out.file_writer
        raw = raw_writer(fw)
        by_step: dict[int, tuple[Summary, float, list[bytes]]] = {}
        for e in events:
            entry = by_step.get(e.step)
            if entry is None:
                entry = by_step[e.step] = (Summary(), e.wall_time, [])
            add = entry[0].value.add
            if type(e) is Vector:
                ts, seen = self._tag_set(e)
                if topics.is_histogram(e.topic):  # one numpy pass buckets every sample
                    for tag, h in zip(ts.paths, bins_of(e.values)):
                        if h is not None:
                            add(tag=tag, histo=_histogram(h))
                    continue
                if raw is not None and e.step >= 0:  # the values into templates
                    entry[2].append(ts.block().fill(e.values))
                    if ts.logs is not None:
                        entry[2].append(ts.log_block().fill([_log10(v) for v in e.values]))
                else:
                    self._scalars(add, ts.paths, e.values, ts.logs)
                if not seen:
                    new_tag |= self._record(e.topic, ts.paths, ts.logs)
                continue
            tag = e.tag_path()
            v = e.value
            if isinstance(v, str):
                entry[0].value.extend(_text(tag, v).value)
            elif isinstance(v, list) or topics.is_histogram(e.topic):
                h = bins(v if isinstance(v, list) else [v])
                if h is not None:
                    add(tag=tag, histo=_histogram(h))
            else:
                logs = _log_tags(e.topic, (tag,)) if e.topic in LOG10_TOPICS else None
                self._scalars(add, (tag,), (v,), logs)
                new_tag |= self._record(e.topic, (tag,), logs)
        for step, (summary, wall, blocks) in by_step.items():
            self._last_step = max(self._last_step, step)
            if blocks:  # Summary bytes are its values' records, in any order
                blocks.append(summary.SerializeToString())
                raw(event_record(wall or time.time(), step, b"".join(blocks)))
            elif summary.value:
                fw.add_summary(summary, step, wall or None)
        if new_tag:
            self._write_layout()

    def _tag_set(self, e: Vector) -> tuple[_TagSet, bool]:
        """(the Vector's tags, True when they were recorded before): producers pass the same
        ``params`` list every step, so this is a look-up after the first."""
        key = (e.topic, id(e.params))
        hit = self._tag_sets.get(key)
        if hit is not None and hit.params is e.params:
            return hit, True
        if len(self._tag_sets) > 256:  # fresh lists every step: do not grow
            self._tag_sets.clear()
        hit = self._tag_sets[key] = _TagSet(e)
        return hit, False

    @staticmethod
    def _scalars(add, tags, values, logs) -> None:
        """Add scalar ``values`` under ``tags`` and, for a topic spanning decades, their
        log10 under ``logs`` (None: none)."""
        for tag, v in zip(tags, values):
            add(tag=tag, simple_value=v)
        if logs is not None:
            for tag, v in zip(logs, values):
                add(tag=tag, simple_value=_log10(v))

    def _record(self, topic: str, tags, logs) -> bool:
        """Record scalar ``tags`` (and ``logs``, their log10 twins); True when one is new
        (the layout may change)."""
        new = self._seen(topic, tags)
        if logs is not None:
            new |= self._seen(topic + "_log10", logs)
        return new

    def _seen(self, topic: str, tags) -> bool:
        """Record scalar ``tags`` of ``topic``; True when one is new (the layout may change)."""
        seen = self.scalar_tags.setdefault(topic, set())
        if seen.issuperset(tags):
            return False
        seen.update(tags)
        return True

    def _write_layout(self) -> None:
        layout = build_layout(self.scalar_tags)
        if layout and layout != self.layout:
            from torch.utils.tensorboard.summary import custom_scalars

            # the step keeps the layout records in order: TensorBoard reads the last one
            self._out.file_writer.add_summary(custom_scalars(layout), self._last_step)
            self.layout = layout

    def _write_hparams(self) -> None:
        # written into this run (not a sub-run as add_hparams does) so the metrics are the
        # run's own scalar series
        metrics = [m for m in _METRICS if m in self.scalar_tags]
        fw = self._out.file_writer
        for s in hparams_summaries(self.hparams, metrics):
            fw.add_summary(s, self._last_step)

    def flush(self) -> None:
        """Push buffered events to disk."""
        self.writer.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._out.check()  # a disk that has space again gets the hparams in a new file
        except OSError:
            pass
        if self.hparams:
            self._write_hparams()
        self.writer.close()
