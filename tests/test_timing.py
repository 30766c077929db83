"""Span timing: perf_counter on CPU; on CUDA, event pairs resolved only once the end event
is done (never by synchronizing), carried over to later steps, resolved on close."""

import time

import pytest
import torch

import hooks
from hooks.timing import NULL_SPAN
from tests.helpers import Recorder


def _bus(every=1):
    bus, rec = hooks.Bus(every=every), Recorder()
    bus.subscribe(rec, "*")
    return bus, rec


def test_cpu_span_measures_the_block_in_ms():
    bus, rec = _bus()
    bus.begin_step(0)
    t0 = time.perf_counter()
    with bus.span("test/sleep", param="w"):
        time.sleep(0.02)
    outer = (time.perf_counter() - t0) * 1e3
    bus.end_step()
    (ms,) = rec.values("time/test/sleep", "w")
    assert 20.0 <= ms <= outer


def test_unwanted_span_is_the_null_span():
    bus, rec = _bus(every=2)
    bus.begin_step(1)  # unsampled
    assert bus.span("test/x") is NULL_SPAN
    bus.end_step()
    bus.begin_step(2)
    assert bus.span("test/x") is not NULL_SPAN
    lonely = hooks.Bus()
    lonely.begin_step(0)
    assert lonely.span("test/x") is NULL_SPAN  # sampled but nobody listens
    assert rec.events == []


class FakeTimer:
    """A CudaTimer stand-in whose end event completes when the test says so."""

    def __init__(self, ms):
        self.ms, self.finished, self.waited = ms, False, False

    def done(self):
        return self.finished

    def elapsed_ms(self, wait=False):
        if wait:
            self.waited = True
        elif not self.finished:
            raise AssertionError("elapsed_ms read before the end event was done")
        return self.ms


def test_unresolved_pairs_carry_over_and_resolve_on_close():
    bus, rec = _bus()
    a, b = FakeTimer(1.5), FakeTimer(2.5)
    bus.begin_step(0)
    bus._add_timer("time/test/a", a, {"param": "p"})
    bus._add_timer("time/test/b", b, {})
    bus.end_step()
    assert rec.events == []  # neither end event is done: nothing read, nothing waited
    a.finished = True
    bus.begin_step(1)
    bus.end_step()
    assert [(e.topic, e.step, e.value) for e in rec.events] == [("time/test/a", 0, 1.5)]
    assert not b.waited
    bus.close()
    assert b.waited and [(e.topic, e.step) for e in rec.events[1:]] == [("time/test/b", 0)]


@pytest.mark.cuda
def test_cuda_span_resolves_without_sync():
    dev = torch.device("cuda")
    bus, rec = _bus(every=2)
    bus.device = dev
    x = torch.randn(256, 256, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bus.begin_step(0)  # sampled: a pair of events, the end still far from done
        with bus.span("test/busy", param="x"):
            torch.cuda._sleep(200_000_000)
            y = x @ x
        bus.emit("train/loss", y.sum())  # a device value resolved with the step's batch
        bus.end_step()
        assert rec.values("time/test/busy", "x") == []  # not done yet: carried over
        bus.begin_step(1)  # unsampled: nothing timed, and no sync anywhere
        assert bus.span("test/busy") is NULL_SPAN
        with bus.span("test/busy"):
            y = y @ x
        bus.emit("train/loss", y.sum())
        bus.end_step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    bus.begin_step(2)
    bus.end_step()  # the end event now reports done: resolved at this boundary
    (ms,) = rec.values("time/test/busy", "x")
    assert ms > 1.0 and [e.step for e in rec.events if e.topic == "time/test/busy"] == [0]
    bus.close()
    assert len(rec.values("train/loss")) == 2


@pytest.mark.cuda
def test_cuda_span_matches_an_independent_event_pair():
    dev = torch.device("cuda")
    bus, rec = _bus()
    bus.device = dev
    x = torch.randn(1024, 1024, device=dev)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    bus.begin_step(0)
    s.record()
    with bus.span("test/mm"):
        for _ in range(20):
            x = x @ x / 1024
    e.record()
    bus.end_step()
    bus.close()
    torch.cuda.synchronize()
    (ms,) = rec.values("time/test/mm")
    assert 0 < ms <= s.elapsed_time(e) * 1.05
