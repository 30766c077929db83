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


def _is_histogram(topic: str) -> bool:
    row = topics.lookup(topic)
    return row is not None and row.kind == topics.HISTOGRAM


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
        self._paths: dict[tuple[str, int], tuple[list, list[str]]] = {}
        self._logs: dict[int, tuple[list, list[str]]] = {}
        self._blocks: dict[int, tuple] = {}
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
                paths, seen = self._paths_of(e)
                if _is_histogram(e.topic):  # one numpy pass buckets every sample
                    for tag, h in zip(paths, bins_of(e.values)):
                        if h is not None:
                            add(tag=tag, histo=_histogram(h))
                elif raw is not None and e.step >= 0:  # the values into a template
                    new_tag |= self._scalar_block(entry[2], e, paths, seen)
                else:
                    new_tag |= self._scalars(add, e.topic, paths, e.values, seen)
                continue
            tag = e.tag_path()
            v = e.value
            if isinstance(v, str):
                entry[0].value.extend(_text(tag, v).value)
            elif isinstance(v, list) or _is_histogram(e.topic):
                h = bins(v if isinstance(v, list) else [v])
                if h is not None:
                    add(tag=tag, histo=_histogram(h))
            else:
                new_tag |= self._scalars(add, e.topic, (tag,), (v,))
        for step, (summary, wall, blocks) in by_step.items():
            self._last_step = max(self._last_step, step)
            if blocks:  # Summary bytes are its values' records, in any order
                blocks.append(summary.SerializeToString())
                raw(event_record(wall or time.time(), step, b"".join(blocks)))
            elif summary.value:
                fw.add_summary(summary, step, wall or None)
        if new_tag:
            self._write_layout()

    def _scalar_block(self, out: list[bytes], e: Vector, paths: list[str], seen: bool) -> bool:
        """Append the Summary records of a per-parameter scalar Vector (and of its log10
        twins) to ``out``, filled from templates kept per tags list; True for a new tag."""
        hit = self._blocks.get(id(paths))
        if hit is None or hit[0] is not paths:
            if len(self._blocks) > 256:
                self._blocks.clear()
            logs = self._log_paths(e.topic, paths) if e.topic in LOG10_TOPICS else None
            hit = self._blocks[id(paths)] = (paths, ScalarBlock(paths), logs,
                                              None if logs is None else ScalarBlock(logs))
        _, block, logs, log_block = hit
        out.append(block.fill(e.values))
        new = False if seen else self._seen(e.topic, paths)
        if log_block is not None:
            out.append(log_block.fill([_log10(v) for v in e.values]))
            if not seen:
                new |= self._seen(e.topic + "_log10", logs)
        return new

    def _paths_of(self, e: Vector) -> tuple[list[str], bool]:
        """(the Vector's tags, True when they were written before): producers pass the same
        ``params`` list every step, so its tags are made and recorded once."""
        key = (e.topic, id(e.params))
        hit = self._paths.get(key)
        if hit is not None and hit[0] is e.params:
            return hit[1], True
        if len(self._paths) > 256:  # fresh lists every step: do not grow
            self._paths.clear()
        paths = e.tag_paths()
        self._paths[key] = (e.params, paths)
        return paths, False

    def _log_paths(self, topic: str, tags: list[str]) -> list[str]:
        """The log10 twins' tags of ``tags`` (made once per list, as :meth:`_paths_of`)."""
        hit = self._logs.get(id(tags))
        if hit is not None and hit[0] is tags:
            return hit[1]
        if len(self._logs) > 256:
            self._logs.clear()
        n = len(topic)
        logs = [f"{topic}_log10{t[n:]}" for t in tags]
        self._logs[id(tags)] = (tags, logs)
        return logs

    def _scalars(self, add, topic: str, tags, values, seen: bool = False) -> bool:
        """Add scalar ``values`` under ``tags`` (and their log10 twins for a topic spanning
        decades); True when a tag is new (the layout may change). ``seen``: ``tags`` were
        recorded before."""
        for tag, v in zip(tags, values):
            add(tag=tag, simple_value=v)
        new = False if seen else self._seen(topic, tags)
        if topic in LOG10_TOPICS:
            logs = self._log_paths(topic, tags)
            for tag, v in zip(logs, values):
                add(tag=tag, simple_value=_log10(v))
            if not seen:
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
