"""``probe.attach``: telemetry for any ``torch.optim.Optimizer`` through its own step hooks."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from typing import Any

import torch

import hooks
from dashboards import JSONLines, Summary, TensorBoard
from probe.names import parameter_names
from probe.stats import abs_sums, step_stats, value_sample

_STAT_TOPICS = ("grad/norm", "param/norm", "update/norm", "update/ratio", "update/cos_grad")
_NEEDS_BEFORE = ("param/norm", "update/norm", "update/ratio", "update/cos_grad", "update/hist")


class Probe:
    """An optimizer under observation; made by :func:`attach`, closed by ``close()``."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, model: torch.nn.Module | None = None,
                 logdir: str | os.PathLike | None = None, every: int = 10,
                 collectors: Iterable[Any] | None = None, bus: hooks.Bus | None = None,
                 profile: bool = False, gpu: str | bool = "auto",
                 histograms: bool = True) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, "
                             f"got {type(optimizer).__name__}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module or None, "
                             f"got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if gpu not in ("auto", True, False):
            raise ValueError(f"gpu must be 'auto', True or False, got {gpu!r}")
        if not isinstance(profile, bool):
            raise ValueError(f"profile must be True or False, got {profile!r}")
        collectors = list(collectors) if collectors is not None else None
        if collectors is not None:
            for c in collectors:
                if not callable(getattr(c, "handle", None)):
                    raise ValueError(f"collectors must have a handle(events) method, got {c!r}")
        self.optimizer = optimizer
        self.model = model
        self.logdir = os.fspath(logdir) if logdir is not None else None
        # a project optimizer carries the bus it emits on: the probe drives that one
        self.bus = hooks.resolve_bus(bus if bus is not None else getattr(optimizer, "bus", None))
        self.bus.every = every
        self.histograms = histograms
        first = next((p for g in optimizer.param_groups for p in g["params"]), None)
        if first is not None:
            self.bus.device = first.device
        self._names = parameter_names(optimizer, model)
        self._step = 0
        self._params_key: tuple = ()
        self._params_cache: tuple[list, list] = ([], [])
        self._before: list[torch.Tensor] | None = None
        self._step_timer = None
        self._overhead = 0.0
        self._closed = False

        self.summary_collector = Summary()
        if collectors is None:
            collectors = []
            if self.logdir is not None:
                os.makedirs(self.logdir, exist_ok=True)
                collectors = [TensorBoard(self.logdir),
                              JSONLines(os.path.join(self.logdir, "events.jsonl"))]
        self.collectors = [self.summary_collector, *collectors]
        self._subs = [self.bus.subscribe(c, "*") for c in self.collectors]
        self._handles = [optimizer.register_step_pre_hook(self._pre_step),
                         optimizer.register_step_post_hook(self._post_step)]

    # -- parameters ----------------------------------------------------------------------
    def _params(self) -> tuple[list[torch.Tensor], list[dict]]:
        key = tuple(id(p) for g in self.optimizer.param_groups for p in g["params"]
                    if p.grad is not None)
        if key == self._params_key:
            return self._params_cache
        params, tags = [], []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                name = self._names.get(id(p))
                if name is None:  # a group added after attach
                    self._names = parameter_names(self.optimizer, self.model)
                    name = self._names[id(p)]
                params.append(p)
                tags.append({"param": name})
        self._params_key, self._params_cache = key, (params, tags)
        return params, tags

    # -- the hooks -----------------------------------------------------------------------
    def _pre_step(self, optimizer, args, kwargs) -> None:
        t0 = time.perf_counter()
        bus = self.bus
        bus.begin_step(self._step)
        params, tags = self._params()
        if params and bus.wants("anomaly/nonfinite"):
            self._check_nonfinite(bus, params, tags)
        if bus.sampled and params and any(bus.wants(t) for t in _NEEDS_BEFORE):
            self._before = [p.detach().clone() for p in params]
        self._step_timer = bus.timer("step/time_ms")
        self._overhead = time.perf_counter() - t0
        self._step_timer.__enter__()

    def _check_nonfinite(self, bus: hooks.Bus, params: list[torch.Tensor],
                         tags: list[dict]) -> None:
        m = abs_sums([p.grad for p in params])
        if m.device.type == "cpu":  # reading host memory is no sync: emit only what fired
            bad = [t for v, t in zip(m.tolist(), tags) if not math.isfinite(v)]
            for t in bad:
                bus.emit("anomaly/nonfinite", 1.0, **t)
            if bad or bus.sampled:
                bus.emit("anomaly/nonfinite", float(len(bad)))
        else:  # on CUDA the flags stay on device and resolve with the step's batch
            flags = (~torch.isfinite(m)).float()
            bus.emit_each("anomaly/nonfinite", flags, tags)
            bus.emit("anomaly/nonfinite", flags.sum())

    def _post_step(self, optimizer, args, kwargs) -> None:
        self._step_timer.__exit__(None, None, None)
        t0 = time.perf_counter()
        bus = self.bus
        try:
            if bus.sampled:
                self._sampled_stats(bus)
        finally:
            self._before = None
            if bus.wants("probe/overhead_ms"):
                bus.emit("probe/overhead_ms", (self._overhead + time.perf_counter() - t0) * 1e3)
            bus.end_step()
            self._step += 1

    def _sampled_stats(self, bus: hooks.Bus) -> None:
        params, tags = self._params()
        if not params:
            return
        grads = [p.grad for p in params]
        if self._before is not None and len(self._before) == len(params):
            stats = step_stats(self._before, [p.detach() for p in params], grads)
            for topic in _STAT_TOPICS:
                bus.emit_each(topic, stats[topic], tags)
            for topic in ("grad/norm", "param/norm", "update/norm"):
                bus.emit(topic, stats["total/" + topic])
            if self._hist_step() and bus.wants("update/hist"):
                for u, t in zip(stats["updates"], tags):
                    bus.emit("update/hist", value_sample(u), **t)
        elif bus.wants("grad/norm"):
            g = torch.stack(torch._foreach_norm(grads)).float()
            bus.emit_each("grad/norm", g, tags)
            bus.emit("grad/norm", g.square().sum().sqrt())
        if self._hist_step() and bus.wants("grad/hist"):
            for g, t in zip(grads, tags):
                bus.emit("grad/hist", value_sample(g), **t)
        if bus.device.type == "cuda" and bus.wants("cuda/memory_allocated"):
            dev = bus.device
            bus.emit("cuda/memory_allocated", torch.cuda.memory_allocated(dev), param=str(dev))
            bus.emit("cuda/max_memory_allocated", torch.cuda.max_memory_allocated(dev),
                     param=str(dev))

    def _hist_step(self) -> bool:
        # histograms copy values, so they come every 10th sampled step
        return self.histograms and self._step % (10 * self.bus.every) == 0

    # -- the user's side -----------------------------------------------------------------
    @property
    def step(self) -> int:
        """The number of optimizer steps observed so far."""
        return self._step

    def log(self, topic: str, value: Any, **tags: Any) -> None:
        """Log a training-loop value (``train/loss``, ``eval/accuracy``, ``user/<name>``);
        a tensor is resolved with the step's batch, not synchronized here."""
        if not isinstance(topic, str) or not hooks.topics.is_declared(topic):
            raise ValueError(f"topic must be a catalogue topic such as 'train/loss' or "
                             f"'user/<name>', got {topic!r}")
        self.bus.emit(topic, value, **tags)

    def summary(self) -> dict[str, dict]:
        """Aggregates per tag: count, last, min, max, mean (text: last)."""
        return self.summary_collector.result()

    def flush(self) -> None:
        """Deliver everything pending now."""
        self.bus.flush()

    def detach(self) -> None:
        """Remove the optimizer hooks; the optimizer is left exactly as before attach."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def close(self) -> None:
        """Detach, flush every pending event and close this probe's collectors."""
        if self._closed:
            return
        self._closed = True
        self.detach()
        try:
            self.bus.flush()
        finally:
            for sub in self._subs:
                sub.close()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def attach(optimizer: torch.optim.Optimizer, *, model: torch.nn.Module | None = None,
           logdir: str | os.PathLike | None = None, every: int = 10,
           collectors: Iterable[Any] | None = None, bus: hooks.Bus | None = None,
           profile: bool = False, gpu: str | bool = "auto", histograms: bool = True) -> Probe:
    """Observe ``optimizer``: step time, gradient/update statistics and anomalies, delivered to
    TensorBoard + JSON lines in ``logdir`` (or to ``collectors``) every ``every`` steps."""
    return Probe(optimizer, model=model, logdir=logdir, every=every, collectors=collectors,
                 bus=bus, profile=profile, gpu=gpu, histograms=histograms)
