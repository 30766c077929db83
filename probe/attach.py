"""``probe.attach``: telemetry for any ``torch.optim.Optimizer`` through its own step hooks."""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch

import hooks
from dashboards import Background, JSONLines, Profiler, Summary, TensorBoard
from dashboards.hparams import check_hparams
from probe import distributed, sharded
from probe.checkpoint import CheckpointHooks
from probe.gpu import Sampler
from probe.names import module_of, parameter_names
from probe.received import Received
from probe.runlock import RunLock
from probe.skip import SkippedStep
from probe.stats import (
    STAT_ROWS,
    FiniteCheck,
    abs_sums,
    finish_stats,
    finish_stats_host,
    group_step_norms,
    sample_size,
    snapshot,
    step_norms,
    value_sample,
)

PER = ("param", "module", "total")  # the granularity of the per-tensor statistics
DEFAULT_QUEUE_BATCHES = 1024  # steps of backlog a default collector's worker may hold
_NEEDS_BEFORE = ("param/norm", "update/norm", "update/ratio", "update/cos_grad", "update/hist")
_STAT_TOPICS = (*_NEEDS_BEFORE, "grad/norm", "grad/hist")
_ON_NONFINITE = ("report", "skip")
# live probes by optimizer and by bus: one probe drives one optimizer and one bus at a time
_LIVE_BY_OPTIMIZER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LIVE_BY_BUS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# wrapper optimizers keep the real one in one of these attributes and step it themselves
_INNER = ("optimizer", "base_optimizer", "_optimizer", "inner_optimizer")


def _inner_optimizer(optimizer: Any) -> tuple[str, Any] | None:
    for attr in _INNER:
        inner = getattr(optimizer, attr, None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
            return attr, inner
    return None


_HOOK_DICTS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
               "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
               "_optimizer_load_state_dict_post_hooks")


def _check_wrapper(optimizer: Any) -> None:
    """Refuse a wrapper optimizer whose own step hooks cannot see its steps: one that skipped
    ``Optimizer.__init__`` (pytorch-optimizer's Lookahead) or steps in two halves (SAM's
    ``first_step``/``second_step``). BlockSchedule-like wrappers with real hooks are fine."""
    found = _inner_optimizer(optimizer)
    if found is None:
        return
    if all(hasattr(optimizer, a) for a in _HOOK_DICTS) and \
            not callable(getattr(optimizer, "first_step", None)):
        return
    attr, inner = found
    raise ValueError(f"optimizer: {type(optimizer).__name__} wraps another optimizer "
                     f"(.{attr}, a {type(inner).__name__}) and steps it itself; attach to the "
                     f"inner optimizer instead: probe.attach(opt.{attr}, ...)")


def _check_log_value(topic: str, value: Any) -> Any:
    """``value`` as the bus takes it (a float, a 0-d tensor, a str for text topics), or a
    ValueError naming what is wrong: bad values are refused at ``p.log``, never in a step."""
    row = hooks.topics.lookup(topic)
    if row is not None and row.kind == hooks.topics.TEXT:
        if not isinstance(value, str):
            raise ValueError(f"value for the text topic {topic!r} must be a str, "
                             f"got {type(value).__name__}")
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.is_sparse:
            raise ValueError(f"value for {topic!r} must be a real 1-element tensor, got shape "
                             f"{tuple(value.shape)} {value.dtype}")
        return value.detach().reshape(())
    if not isinstance(value, numbers.Real) and getattr(value, "size", None) == 1 \
            and callable(getattr(value, "item", None)):
        value = value.item()  # a 0-d or 1-element numpy array
    if isinstance(value, numbers.Real):  # int, float, bool, numpy scalars, Fraction, ...
        try:
            return float(value)
        except (OverflowError, ValueError, TypeError) as exc:
            raise ValueError(f"value for {topic!r} must fit a float64, got "
                             f"{str(value)[:40]}...") from exc
    raise ValueError(f"value for {topic!r} must be a real number (int, float, numpy scalar) or "
                     f"a 1-element tensor, got {type(value).__name__}")


def _closure_of(args: tuple, kwargs: dict):
    """(the closure passed to ``step``, where: "kwargs" or its index in ``args``) or (None,
    None). ``args[0]`` is the optimizer itself."""
    c = kwargs.get("closure")
    if c is not None:
        return (c, "kwargs") if callable(c) else (None, None)
    if len(args) > 1 and callable(args[1]):
        return args[1], 1
    return None, None


def _with_closure(args: tuple, kwargs: dict, where, closure) -> tuple[tuple, dict]:
    if where == "kwargs":
        return args, {**kwargs, "closure": closure}
    return (*args[:where], closure, *args[where + 1:]), kwargs


def _on_stack(frame, top) -> bool:
    """Is ``frame`` still running, i.e. ``top`` or one of its callers?"""
    f = top
    while f is not None:
        if f is frame:
            return True
        f = f.f_back
    return False


class Probe:
    """An optimizer under observation; made by :func:`attach`, closed by ``close()``."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, model: torch.nn.Module | None = None,
                 logdir: str | os.PathLike | None = None, every: int = 10,
                 collectors: Iterable[Any] | None = None, bus: hooks.Bus | None = None,
                 profile: bool = False, gpu: str | bool = "auto",
                 histograms: bool = True, on_nonfinite: str = "report",
                 reduce: str | None = None, hparams: dict | None = None,
                 per: str = "param") -> None:
        hparams = check_hparams(hparams)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, "
                             f"got {type(optimizer).__name__}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module or None, "
                             f"got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if not (gpu is True or gpu is False  # 1 == True: refuse ints
                or isinstance(gpu, str) and gpu == "auto"):
            raise ValueError(f"gpu must be 'auto', True or False, got {gpu!r}")
        if not isinstance(profile, bool):
            raise ValueError(f"profile must be True or False, got {profile!r}")
        if profile and logdir is None:
            raise ValueError("profile=True needs a logdir to write the traces to")
        if not isinstance(histograms, bool):
            raise ValueError(f"histograms must be True or False, got {histograms!r}")
        if not isinstance(on_nonfinite, str) or on_nonfinite not in _ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {_ON_NONFINITE}, got {on_nonfinite!r}")
        if not (reduce is None or isinstance(reduce, str) and reduce in distributed.REDUCE_OPS):
            raise ValueError(f"reduce must be one of {distributed.REDUCE_OPS}, got {reduce!r}")
        if not isinstance(per, str) or per not in PER:
            raise ValueError(f"per must be one of {PER}, got {per!r}")
        if per != "param" and reduce is not None:
            raise ValueError(f"per={per!r} with reduce={reduce!r} is not supported: reduced "
                             f"statistics are per parameter (use per='param')")
        if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
            raise ValueError(f"logdir must be a path or None, got {type(logdir).__name__}")
        if logdir is not None and not os.fspath(logdir):
            raise ValueError("logdir must be a non-empty path (or None for no files), got ''")
        if logdir is not None and os.path.exists(logdir) and not os.path.isdir(logdir):
            raise ValueError(f"logdir must be a folder, but {os.fspath(logdir)!r} is a file")
        if bus is not None and not isinstance(bus, hooks.Bus):
            raise ValueError(f"bus must be a hooks.Bus or None, got {type(bus).__name__}")
        if collectors is not None and callable(getattr(collectors, "handle", None)):
            raise ValueError("collectors must be a list of collectors (got one collector: "
                             "pass collectors=[it])")
        if collectors is not None and (isinstance(collectors, (str, bytes))
                                       or not isinstance(collectors, Iterable)):
            raise ValueError(f"collectors must be a list of objects with handle(events) or "
                             f"None, got {type(collectors).__name__}")
        try:  # a 0-d tensor is an Iterable that cannot be iterated
            collectors = list(collectors) if collectors is not None else None
        except TypeError as exc:
            raise ValueError(f"collectors must be a list of objects with handle(events) or "
                             f"None, got {type(collectors).__name__}: {exc}") from None
        if collectors is not None:
            for c in collectors:
                if not callable(getattr(c, "handle", None)):
                    raise ValueError(f"collectors must have a handle(events) method, got {c!r}")
        _check_wrapper(optimizer)
        if optimizer in _LIVE_BY_OPTIMIZER:
            raise ValueError("optimizer already has a probe attached; close() or detach() it "
                             "first (one probe per optimizer: several collectors go in "
                             "collectors=[...])")
        self.ranks = distributed.rank_and_world()
        if reduce is not None and self.ranks is None:
            raise ValueError("reduce needs torch.distributed to be initialized; "
                             "use reduce=None for a single process")
        if reduce is not None:  # a mismatch would hang the first reduction: refuse it now
            distributed.check_same_on_all_ranks(
                {"every": every,
                 "the number of parameters": sum(len(g["params"])
                                                 for g in optimizer.param_groups)})
        self.optimizer = optimizer
        self.model = model
        self.logdir = os.fspath(logdir) if logdir is not None else None
        # a project optimizer carries the bus it emits on: the probe drives that one; any
        # other optimizer gets a bus of this probe's own, so probes never see each other
        own = getattr(optimizer, "bus", None)
        if bus is not None and isinstance(own, hooks.Bus) and own is not bus:
            raise ValueError("bus: this optimizer emits on its own bus (optimizer.bus); pass "
                             "that bus, or None to use it, so its telemetry reaches the probe")
        chosen = bus if bus is not None else own if isinstance(own, hooks.Bus) else hooks.Bus()
        if chosen in _LIVE_BY_BUS:
            raise ValueError("bus: another live probe drives this bus (two optimizers share "
                             "it); give each optimizer a bus of its own (bus=None does)")
        self.bus = chosen
        self.bus.every = every
        self.run_id = uuid.uuid4().hex[:12]
        self.histograms = histograms
        self.on_nonfinite = on_nonfinite
        self.reduce = reduce
        self.per = per
        self._skipping: SkippedStep | None = None
        first = next((p for g in optimizer.param_groups for p in g["params"]), None)
        if first is not None:
            self.bus.device = first.device
        self._names = parameter_names(optimizer, model)
        self._step = 0
        self._params_key: tuple = ()
        self._params_cache: tuple[list, list] = ([], [])
        self._groups: tuple[torch.Tensor, list[int], list[dict]] | None = None
        self._before: list[torch.Tensor] | None = None
        # (gradients, tags) of the step, when their finiteness check waits for step_norms' |g|
        self._unchecked: tuple[list[torch.Tensor], list[dict]] | None = None
        self._received: Received | None = None
        # the step's gradient list, held until the step ends: while its Python tensors live,
        # the optimizer's own p.grad reads reuse them (letting them go made it wrap all 150
        # of a transformer's again, 100 us a step)
        self._held: list[torch.Tensor] | None = None
        self._dtensors = sharded.DTensor is not None and any(
            isinstance(p, sharded.DTensor) for g in optimizer.param_groups for p in g["params"])
        self._shards: list | None = None
        # does step() rewrite .grad in place? None: not seen yet (copy on the first sample)
        self._copy_grads: bool | None = None
        self._finite = FiniteCheck()
        self._step_timer = None
        self._in_step = False
        self._step_frame = None  # torch's step wrapper running the step in progress
        self._nested = 0  # step() calls inside it (a subclass calling super().step())
        self._overhead = 0.0
        self._paused = False
        self._closed = False
        self.skipped_steps = 0
        self.scaler_skipped_steps = 0  # fused optimizers' overflow steps under GradScaler
        self._handles: list = []
        self._subs: list = []
        self._checkpoint: CheckpointHooks | None = None
        self.sampler: Sampler | None = None
        self.profiler: Profiler | None = None
        self.collectors: list = []
        self._lock: RunLock | None = None
        if any(optimizer.state.values()):
            print("optprobe: this optimizer already has state (a checkpoint loaded before "
                  "attach, or earlier steps): the probe counts from step 0; load checkpoints "
                  "after attach so the step count in state_dict()['optprobe'] continues",
                  file=sys.stderr)
        try:  # attach is atomic: whatever fails, nothing stays hooked, subscribed or running
            self._wire(optimizer, model, collectors, profile, gpu, hparams)
        except BaseException:
            self._release()
            raise
        _LIVE_BY_OPTIMIZER[optimizer] = self
        _LIVE_BY_BUS[self.bus] = self

    def _wire(self, optimizer, model, collectors, profile, gpu, hparams) -> None:
        self.summary_collector = Summary()
        if collectors is None:
            collectors = []
            if self.logdir is not None:
                collectors = self._default_collectors(self.logdir, hparams)
        for c in collectors:  # a Background collector's drops count in probe/dropped_events
            if isinstance(c, Background) and c.bus is None:
                c.bus = self.bus
        # owned from here: a failure later in attach must close them too
        self.collectors = [self.summary_collector, *collectors]
        self.profiler = Profiler(self.logdir) if profile else None
        if self.profiler is not None:
            collectors = [*collectors, self.profiler]
        self.collectors = [self.summary_collector, *collectors]
        routed = self.collectors if self.ranks is None else \
            [distributed.RankTagged(c, self.ranks[0]) for c in self.collectors]
        self._subs = [self.bus.subscribe(c, "*") for c in routed]
        self.sampler = self._make_sampler(gpu)
        self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
        self._handles.append(optimizer.register_step_post_hook(self._post_step))
        self._checkpoint = CheckpointHooks(optimizer, self)
        self._profile_due = False
        if self.profiler is not None:
            # with a model the profiler steps at the next forward, so ProfilerStep#k
            # ranges (forward, backward, step) nest; without one they are left out
            self.profiler.start(self._step, step_markers=model is not None)
            if model is not None:
                self._handles.append(model.register_forward_pre_hook(self._forward_pre))

    def _default_collectors(self, logdir: str, hparams: dict | None) -> list:
        # one JSON-lines file per rank; TensorBoard from rank 0 only (one series per tag)
        os.makedirs(logdir, exist_ok=True)
        self._lock = RunLock(logdir, self.run_id)
        name = "events.jsonl" if self.ranks is None else f"events-rank{self.ranks[0]}.jsonl"
        jsonl = JSONLines(os.path.join(logdir, name), run_id=self.run_id)
        try:
            files = [jsonl] if self.ranks is not None and self.ranks[0] != 0 else \
                [TensorBoard(logdir, hparams=hparams), jsonl]
        except BaseException:
            jsonl.close()
            raise
        # encoding and writing run on a worker each, off the training thread; flush() and
        # close() wait for them
        return [Background(c, max_batches=DEFAULT_QUEUE_BATCHES, bus=self.bus) for c in files]

    def _make_sampler(self, gpu: str | bool) -> Sampler | None:
        cuda = self.bus.device.type == "cuda"
        if gpu is False or (gpu == "auto" and not cuda):
            return None
        return Sampler([self.bus.device] if cuda else None)

    # -- parameters ----------------------------------------------------------------------
    def _grads(self) -> list[torch.Tensor]:
        # what every step needs; names and tags wait for a sampled step or an anomaly
        grads = [g for group in self.optimizer.param_groups for p in group["params"]
                 if (g := p.grad) is not None]
        return [sharded.local(g) for g in grads] if self._dtensors else grads

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
        # FSDP2's DTensors: statistics of the local shards, summed over the mesh
        self._shards = sharded.shard_groups(params)
        if self._dtensors:
            params = [sharded.local(p) for p in params]
        self._params_key, self._params_cache = key, (params, tags)
        self._groups = None
        return params, tags

    def _grouping(self) -> tuple[torch.Tensor, list[int], list[dict]] | None:
        """For ``per="module"``/``"total"``: (index of each parameter's group, the same as a
        list, the groups' tags); None for ``per="param"``. Kept until the parameters change."""
        if self.per == "param":
            return None
        if self._groups is None:
            _, tags = self._params()
            keys = [module_of(t["param"]) if self.per == "module" else "" for t in tags]
            order = {k: i for i, k in enumerate(dict.fromkeys(keys))}
            idx = [order[k] for k in keys]
            self._groups = (torch.tensor(idx, device=self.bus.device), idx,
                            [{"param": k} if k else {} for k in order])
        return self._groups

    # -- the hooks -----------------------------------------------------------------------
    def _pre_step(self, optimizer, args, kwargs) -> tuple[tuple, dict] | None:
        caller = sys._getframe(1)
        if self._in_step:
            if _on_stack(self._step_frame, caller):  # step() called inside step(): one step
                self._nested += 1
                return
            self._abandon_step()  # the last step raised out of optimizer.step(): close it
        if self._paused:  # _post_step returns too: it sees no step open
            return None
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(found_inf, torch.Tensor) and bool(found_inf.item()):
            # GradScaler steps a fused optimizer through an overflow and the kernel skips it;
            # any other optimizer's step the scaler does not call at all: no step either way
            self.scaler_skipped_steps += 1
            return None
        self._step_frame = caller
        t0 = time.perf_counter()
        self._in_step = True
        bus = self.bus
        prof = self.profiler
        if prof is not None and self._profile_due:  # no forward ran since the last step
            self._profile_due = False
            prof.step(self._step)
        # a traced step is always sampled, so its trace carries the step's telemetry
        bus.begin_step(self._step, sampled=True if prof is not None and prof.recording else None)
        if prof is not None:
            prof.mark(self._step)
        closure, where = _closure_of(args, kwargs)
        if closure is None:
            self._held = self._gradients_in(optimizer)
        else:  # the gradients come from the closure, called inside step()
            args, kwargs = _with_closure(args, kwargs, where, self._checked(optimizer, closure))
        self._step_timer = bus.timer("step/time_ms")
        self._overhead = time.perf_counter() - t0
        self._step_timer.__enter__()
        return None if closure is None else (args, kwargs)

    def _gradients_in(self, optimizer) -> list[torch.Tensor]:
        """What the step's gradients decide, as the optimizer receives them: the kept
        statistics, the snapshot of parameters, the non-finite check and the skip. Returns
        the gradients."""
        bus = self.bus
        grads = self._grads()
        # what the optimizer receives is kept first: a skipped step hides the gradients
        if bus.sampled and grads and self._wants_stats(bus):
            params, tags = self._params()
            # a fused optimizer under GradScaler gets the scaled gradients and its kernel
            # unscales them in place, unseen by version counters: copied, then unscaled
            scale = getattr(optimizer, "grad_scale", None)
            scale = scale.detach() if torch.is_tensor(scale) else None
            self._received = Received(params, tags, grads, scale=scale,
                                      copy=self._copy_grads is not False or scale is not None,
                                      ids=self._params_key)
            if self.reduce is not None or any(bus.wants(t) for t in _NEEDS_BEFORE):
                self._before = snapshot(params)
        if grads and self.on_nonfinite == "skip":  # decided before the step
            self._skip_if_nonfinite(bus, optimizer, grads)
        elif grads and bus.wants("anomaly/nonfinite"):
            if self._before is not None and self.reduce is None:
                # the norms after the step name the culprits, no pass of their own: the
                # gradients as received (copies where the optimizer rewrites them)
                self._unchecked = (self._received.grads, self._received.tags)
            else:
                self._check_nonfinite(bus, grads)
        return grads

    def _checked(self, optimizer, closure):
        """``closure`` whose first call (the gradient at the step's starting point: LBFGS's
        first evaluation, Lightning's training step) is followed by :meth:`_gradients_in`;
        later calls (line searches, re-evaluations) run as they are."""
        first = [True]

        def closure_checked(*a, **k):
            loss = closure(*a, **k)
            if first[0] and self._in_step:
                first[0] = False
                t0 = time.perf_counter()
                # not held: later evaluations make new gradients, and holding these would
                # keep a second set alive through the step
                self._gradients_in(optimizer)
                self._overhead += time.perf_counter() - t0
            return loss

        return closure_checked

    def _wants_stats(self, bus: hooks.Bus) -> bool:
        return self.reduce is not None or any(bus.wants(t) for t in _STAT_TOPICS)

    def _abandon_step(self) -> None:
        """The previous step raised inside the optimizer (a caught KeyboardInterrupt): undo a
        skip's hiding (parameters and state back, the gradients left as the loop set them
        since) and deliver what that step had emitted, under its own number."""
        self._in_step = False
        self._step_frame, self._nested = None, 0
        skipping, self._skipping = self._skipping, None
        if skipping is not None:
            skipping.restore(grads=False)
        self._before = self._received = self._held = None
        self._finish_check()
        if self._step_timer is not None:
            self._step_timer.__exit__(None, None, None)
            self._step_timer = None
        self.bus.end_step()

    def _finish_check(self, sums: torch.Tensor | None = None) -> None:
        """The finiteness check left for after the step, with step_norms' |g| when given."""
        unchecked, self._unchecked = self._unchecked, None
        if unchecked is not None:
            self._check_nonfinite(self.bus, *unchecked, sums)

    def _culprits(self, grads: list[torch.Tensor], tags: list[dict] | None = None,
                  sums: torch.Tensor | None = None) -> list[dict]:
        """The tags of the gradients holding a NaN or Inf (a host read: a sync on CUDA)."""
        mask = self._finite.mask(grads, sums)
        if not any(mask):
            return []
        return [t for f, t in zip(mask, tags or self._params()[1]) if f]

    def _check_nonfinite(self, bus: hooks.Bus, grads: list[torch.Tensor],
                         tags: list[dict] | None = None,
                         sums: torch.Tensor | None = None) -> None:
        """``tags``: the gradients' (default: the parameters' now); ``sums``: their norms
        when the step's statistics took them."""
        if grads[0].device.type == "cpu":  # reading host memory is no sync: emit what fired
            bad = self._culprits(grads, tags, sums)
            for t in bad:
                bus.emit("anomaly/nonfinite", 1.0, **t)
            if bad or bus.sampled:
                bus.emit("anomaly/nonfinite", float(len(bad)))
        else:  # on CUDA the flags stay on device and resolve with the step's batch
            m = abs_sums(grads) if sums is None else sums
            flags = (~torch.isfinite(m)).float()
            bus.emit_each("anomaly/nonfinite", flags, tags or self._params()[1])
            bus.emit("anomaly/nonfinite", flags.sum())

    def _skip_if_nonfinite(self, bus: hooks.Bus, optimizer,
                           grads: list[torch.Tensor]) -> None:
        # the user asked to skip: one host read of the flags per step decides before the step
        bad = self._culprits(grads)
        if bus.wants("anomaly/nonfinite"):
            for t in bad:
                bus.emit("anomaly/nonfinite", 1.0, **t)
            if bad or bus.sampled:
                bus.emit("anomaly/nonfinite", float(len(bad)))
        if bad:
            self._skipping = SkippedStep(optimizer)
            self.skipped_steps += 1
        if bus.wants("anomaly/skipped_step") and (bad or bus.sampled):
            bus.emit("anomaly/skipped_step", 1.0 if bad else 0.0)

    def _post_step(self, optimizer, args, kwargs) -> None:
        if not self._in_step:  # attached inside this step: the probe starts at the next one
            return
        if self._nested:
            self._nested -= 1
            return
        self._in_step = False
        self._step_frame = None
        self._step_timer.__exit__(None, None, None)
        self._step_timer = None
        t0 = time.perf_counter()
        bus = self.bus
        if self._skipping is not None:
            self._skipping.restore()
            self._skipping = None
        try:
            if bus.sampled:
                self._sampled_stats(bus)
        finally:
            self._before = self._received = self._held = None
            self._finish_check()  # where the statistics did not run
            if bus.wants("probe/overhead_ms"):
                bus.emit("probe/overhead_ms", (self._overhead + time.perf_counter() - t0) * 1e3)
            if self.sampler is not None and (bus.sampled or self.sampler.status is not None):
                self.sampler.emit(bus)
            bus.end_step()
            self._step += 1
            if self.profiler is not None:
                if self.model is not None:
                    self._profile_due = True
                else:
                    self.profiler.step(self._step)

    def _forward_pre(self, module, args) -> None:
        if self._profile_due:
            self._profile_due = False
            self.profiler.step(self._step)

    def _sampled_stats(self, bus: hooks.Bus) -> None:
        rec = self._received
        params, tags, grads = (rec.params, rec.tags, rec.grads) if rec else ([], [], [])
        if self.reduce is not None:  # the collective runs even when this rank has no grads
            self._reduced_stats(bus, params, grads)
        if not params:
            return
        stale = self._stale(rec)
        if self.reduce is not None:
            pass  # norms, ratios and cosines came reduced; histograms below stay local
        elif self._before is not None and len(self._before) == len(params):
            if self._hist_step() and bus.wants("update/hist"):  # before step_norms takes it
                n = sample_size(len(params))
                self._histograms(bus, "update/hist", [value_sample(p, n) - value_sample(b, n)
                                                      for b, p in zip(self._before, params)],
                                 tags)
            norms = step_norms(self._before, params, grads)
            self._finish_check(norms[0])  # local norms of the gradients as received
            if self._shards:
                norms = sharded.global_norms(norms, self._shards)
            norms = rec.unscaled_norms(norms)
            if stale is not None:
                norms[0, stale] = math.nan
                norms[3, stale] = math.nan
            grouping = self._grouping()
            if grouping is not None:
                norms = group_step_norms(norms, grouping[0].to(norms.device),
                                         len(grouping[2]))
                tags = grouping[2]
            if norms.device.type == "cpu":  # host memory: reading it is no sync
                table, totals = finish_stats_host(norms.tolist())
            else:
                table, totals = finish_stats(norms)
            if self.per != "total":
                for k, topic in enumerate(STAT_ROWS):
                    bus.emit_each(topic, table[k], tags)
            for k, topic in enumerate(STAT_ROWS[:3]):
                bus.emit(topic, totals[k])
        elif bus.wants("grad/norm"):
            g = rec.unscaled(torch.stack(torch._foreach_norm(grads)).float())
            if self._shards:
                g = sharded.global_norms(g.unsqueeze(0), self._shards)[0]
            if stale is not None:
                g[stale] = math.nan
            grouping = self._grouping()
            if grouping is not None:
                g = torch.zeros(len(grouping[2]), device=g.device).index_add_(
                    0, grouping[0].to(g.device), g.square()).sqrt()
            if self.per != "total":
                bus.emit_each("grad/norm", g, tags if grouping is None else grouping[2])
            bus.emit("grad/norm", g.square().sum().sqrt())
        if self._hist_step() and bus.wants("grad/hist"):
            n = sample_size(len(grads))
            self._histograms(bus, "grad/hist",
                             [rec.unscaled(value_sample(g, n)) for g in grads], tags)
        if bus.device.type == "cuda" and bus.wants("cuda/memory_allocated"):
            dev = bus.device
            bus.emit("cuda/memory_allocated", torch.cuda.memory_allocated(dev), param=str(dev))
            bus.emit("cuda/max_memory_allocated", torch.cuda.max_memory_allocated(dev),
                     param=str(dev))

    def _stale(self, rec: Received) -> torch.Tensor | None:
        """Learn whether step() rewrites gradients in place (then they are copied before the
        step from now on); the positions of received gradients that this step rewrote and
        that were not copied (their statistics are unknown: NaN), or None."""
        changed = rec.rewritten()
        if any(changed):
            self._copy_grads = True
        elif self._copy_grads is None:
            self._copy_grads = False
        if rec.copied or not any(changed):
            return None
        return torch.tensor([i for i, c in enumerate(changed) if c], dtype=torch.long)

    def _reduced_stats(self, bus: hooks.Bus, params: list[torch.Tensor],
                       grads: list[torch.Tensor]) -> None:
        # exactly one collective per sampled step on every rank, whatever this rank listens to
        everyone = [p for g in self.optimizer.param_groups for p in g["params"]]
        column = {id(p): i for i, p in enumerate(everyone)}
        dev = bus.device
        rows = torch.zeros(len(STAT_ROWS), len(everyone), device=dev)
        present = torch.zeros(len(everyone), device=dev)
        totals = torch.zeros(3, device=dev)
        if params and self._before is not None and len(self._before) == len(params):
            norms = step_norms(self._before, params, grads)
            if self._shards:
                norms = sharded.global_norms(norms, self._shards)
            norms = self._received.unscaled_norms(norms)
            table, totals = finish_stats(norms)
            idx = torch.tensor([column[i] for i in self._received.ids], device=dev)
            rows[:, idx] = table.to(dev)
            present[idx] = 1.0
            totals = totals.to(dev)
        out, tot = distributed.reduce_stats(rows, present, totals, self.reduce,
                                            self.ranks[1])
        all_tags = [{"param": self._names.get(id(p)) or f"param{i}",
                     "reduced": self.reduce} for i, p in enumerate(everyone)]
        for k, topic in enumerate(STAT_ROWS):
            bus.emit_each(topic, out[k], all_tags)
        for k, topic in enumerate(STAT_ROWS[:3]):
            bus.emit(topic, tot[k], reduced=self.reduce)

    def _histograms(self, bus: hooks.Bus, topic: str, samples: list[torch.Tensor],
                    tags: list[dict]) -> None:
        grouping = self._grouping()
        if grouping is None:
            bus.emit_samples(topic, samples, tags)
            return
        members: list[list[torch.Tensor]] = [[] for _ in grouping[2]]
        for v, i in zip(samples, grouping[1]):
            members[i].append(v.float())
        bus.emit_samples(topic, [torch.cat(vs) for vs in members], grouping[2])

    def _hist_step(self) -> bool:
        # histograms copy values, so they come every 10th sampled step
        return self.histograms and self._step % (10 * self.bus.every) == 0

    # -- the user's side -----------------------------------------------------------------
    @property
    def step(self) -> int:
        """The number of optimizer steps observed so far."""
        return self._step

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Steps taken inside are neither observed nor counted (a step in progress finishes
        as it began): the probe's cost A/B on one model and optimizer, as the scale gates do."""
        if self._closed:
            raise RuntimeError("paused(): this probe is closed")
        before, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = before

    def log(self, topic: str, value: Any, **tags: Any) -> None:
        """Log a training-loop value (``train/loss``, ``eval/accuracy``, ``user/<name>``): a
        real number (numpy scalars too) or a 1-element tensor, resolved with the step's batch
        without a sync; a bad value raises ValueError here, never later in a step."""
        if not isinstance(topic, str) or not hooks.topics.is_declared(topic):
            raise ValueError(f"topic must be a catalogue topic such as 'train/loss' or "
                             f"'user/<name>', got {topic!r}")
        self.bus.emit(topic, _check_log_value(topic, value), **tags)

    def summary(self) -> dict[str, dict]:
        """Aggregates per tag: count, last, min, max, mean (text: last)."""
        return self.summary_collector.result()

    def flush(self) -> None:
        """Deliver everything pending now and wait until the collectors have written it."""
        self.bus.flush()
        for c in self.collectors:
            flush = getattr(c, "flush", None)
            if flush is not None:
                try:
                    flush()
                except Exception as exc:  # a collector's fault never breaks the run
                    print(f"optprobe: flushing {type(c).__name__} failed: {exc!r}",
                          file=sys.stderr)

    def detach(self) -> None:
        """The same as ``close()``: the optimizer is left exactly as before attach, and every
        hook, subscription, thread and file of this probe is released."""
        self.close()

    def _checkpoint_state(self) -> dict:
        return {"version": 1, "step": self._step, "skipped_steps": self.skipped_steps,
                "summary": self.summary_collector.state_dict()}

    def _load_checkpoint_state(self, state: dict) -> None:
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state_dict['optprobe']['step'] must be an int >= 0, got {step!r}")
        self._step = step
        self.skipped_steps = int(state.get("skipped_steps", 0))
        summary = state.get("summary")
        if isinstance(summary, dict):
            self.summary_collector.load_state_dict(summary)

    def close(self) -> None:
        """Remove every hook, flush every pending event and close this probe's collectors;
        the optimizer is left exactly as before attach."""
        if self._closed:
            return
        self._closed = True
        if self._in_step:  # closed from inside a step or after one that raised
            self._abandon_step()
        self._release()

    def _release(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._checkpoint is not None:
            self._checkpoint.remove()
        try:
            if self.sampler is not None:
                self.sampler.close()
            if self._subs:
                self.bus.flush()
        finally:
            closed = {id(getattr(sub.collector, "collector", sub.collector)) for sub in self._subs}
            for sub in self._subs:
                sub.close()
            self._subs = []
            for c in self.collectors:  # made but never subscribed: attach failed midway
                close = getattr(c, "close", None)
                if close is not None and id(c) not in closed:
                    try:
                        close()
                    except Exception as exc:
                        print(f"optprobe: closing {type(c).__name__} failed: {exc!r}",
                              file=sys.stderr)
            if self._lock is not None:
                self._lock.release()
            if _LIVE_BY_OPTIMIZER.get(self.optimizer) is self:
                del _LIVE_BY_OPTIMIZER[self.optimizer]
            if _LIVE_BY_BUS.get(self.bus) is self:
                del _LIVE_BY_BUS[self.bus]

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the training loop's exception is the news: a failing close must not mask it
            self.close()
        except Exception as close_exc:
            print(f"optprobe: close() failed while {exc_type.__name__} propagated: "
                  f"{close_exc!r}", file=sys.stderr)


def attach(optimizer: torch.optim.Optimizer, *, model: torch.nn.Module | None = None,
           logdir: str | os.PathLike | None = None, every: int = 10,
           collectors: Iterable[Any] | None = None, bus: hooks.Bus | None = None,
           profile: bool = False, gpu: str | bool = "auto", histograms: bool = True,
           on_nonfinite: str = "report", reduce: str | None = None,
           hparams: dict | None = None, per: str = "param") -> Probe:
    """Observe ``optimizer``: step time, gradient/update statistics and anomalies, delivered to
    TensorBoard + JSON lines in ``logdir`` (or to ``collectors``) every ``every`` steps.

    ``on_nonfinite="skip"`` makes a step with a NaN/Inf gradient a no-op; ``reduce`` ("mean" or
    "max") reduces per-parameter statistics across torch.distributed ranks; ``hparams``
    (name -> bool/int/float/str) go to TensorBoard's HParams dashboard. ``per`` sets the
    granularity of the per-tensor statistics: "param" (each tensor), "module" (the tensors of
    one module together, tag = the module's name) or "total" (the model-wide totals only)."""
    return Probe(optimizer, model=model, logdir=logdir, every=every, collectors=collectors,
                 bus=bus, profile=profile, gpu=gpu, histograms=histograms,
                 on_nonfinite=on_nonfinite, reduce=reduce, hparams=hparams, per=per)
