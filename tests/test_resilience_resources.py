"""Bounded resources: flat memory under a slow collector, no thread or file-handle leaks."""

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import hooks
import probe
from dashboards.background import Background
from tests.helpers import Recorder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Slow:
    """A collector slower than the training loop (a congested disk)."""

    name = "Slow"

    def __init__(self):
        self.batches = 0

    def handle(self, events):
        time.sleep(0.002)
        self.batches += 1


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_100k_steps_with_a_slow_collector_keep_memory_flat_and_count_drops():
    w = torch.nn.Parameter(torch.ones(4))
    w.grad = torch.ones(4)
    opt = torch.optim.SGD([w], lr=0.0)
    bus = hooks.Bus()
    slow = Slow()
    bg = Background(slow, max_batches=64)
    p = probe.attach(opt, every=1, collectors=[bg], bus=bus, histograms=False)
    pre, post = p._pre_step, p._post_step
    for _ in range(200):  # the probe's own hooks, as a real step calls them
        pre(opt, (), {})
        post(opt, (), {})
    # then the bus driven by hand (what the hooks do per step, minus the statistics maths)
    # so 100k steps stay quick: tensors and floats per step, per-parameter and totals
    norms, tags = torch.ones(2), [{"param": "a"}, {"param": "b"}]
    rss = {}
    for i in range(200, 100_200):
        bus.begin_step(i)
        bus.emit_each("grad/norm", norms, tags)
        bus.emit("grad/norm", norms.sum())
        p.log("train/loss", float(i))
        bus.end_step()
        if i in (10_000, 100_199):
            rss[i] = _rss_bytes()
            assert bg.pending() <= 64 and not bus._pending
    growth = rss[100_199] - rss[10_000]
    assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 90k steps"
    assert bg.bus is bus  # attach wired the drops into probe/dropped_events
    assert bg.dropped > 0 and bus.dropped_events == bg.dropped  # counted, not hidden
    summary = p.summary()
    assert summary["probe/dropped_events"]["last"] > 0
    assert summary["train/loss"]["count"] == 100_000  # the fast collector missed nothing
    assert len(summary) < 50  # aggregates per tag, not per step
    p.close()
    assert not bg.alive
    assert 0 < slow.batches < 100_000  # the slow one fell behind and training did not wait


def test_background_delivers_everything_in_order_when_it_keeps_up():
    rec = Recorder()
    bg = Background(rec, max_batches=1000)
    for s in range(500):
        bg.handle([hooks.Event("train/loss", s, float(s))])
    bg.close()
    assert [e.step for e in rec.events] == list(range(500))
    assert rec.closed and not bg.alive and bg.dropped == 0


def test_background_thread_stops_at_interpreter_exit(tmp_path):
    marker = tmp_path / "closed"
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from dashboards.background import Background
        class C:
            def handle(self, events): time.sleep(0.01)
            def close(self): open({str(marker)!r}, "w").write("closed")
        bg = Background(C())
        for i in range(20): bg.handle([i])
        # no close(): the interpreter exits with the worker still holding a queue
    """)
    res = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True)
    assert res.returncode == 0, res.stderr.decode()
    assert marker.read_text() == "closed"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_no_file_handle_or_thread_leak_over_1000_attach_close_cycles(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def cycle(i):
        with probe.attach(opt, model=model, logdir=tmp_path / f"r{i % 3}", every=1,
                          bus=hooks.Bus()):
            model(torch.ones(1, 3)).sum().backward()
            opt.step()
            opt.zero_grad()

    for i in range(5):  # warm up lazy imports and their long-lived handles
        cycle(i)
    fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
    for i in range(1000):
        cycle(i)
    assert len(os.listdir("/proc/self/fd")) <= fds
    assert threading.active_count() <= threads
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_state_dict_post_hooks


def test_background_close_with_a_collector_that_blocks_forever_takes_one_join_timeout():
    release = threading.Event()

    class Stuck:
        def handle(self, events):
            release.wait()  # a write on a dead NFS mount

        def close(self):
            pass

    bg = Background(Stuck(), max_batches=2, join_timeout=0.5)
    for _ in range(5):  # one in the worker, two queued, the rest dropped
        bg.handle([1])
    t0 = time.monotonic()
    bg.close()
    took = time.monotonic() - t0
    release.set()
    assert took < 0.9, took  # before: the queue put and the join waited 0.5 s each
    assert bg.dropped in (2, 3)  # 3 when the worker had not taken the first batch yet


def test_background_flush_waits_for_the_queued_batches_and_the_collector_flush():
    class Slow:
        def __init__(self):
            self.got, self.flushed = [], 0

        def handle(self, events):
            time.sleep(0.02)
            self.got.extend(events)

        def flush(self):
            self.flushed += 1

    c = Slow()
    bg = Background(c)
    for i in range(10):
        bg.handle([i])
    assert bg.flush() is True
    assert c.got == list(range(10)) and c.flushed == 1
    bg.close()
    assert bg.flush() is False  # closed: nothing to wait for
