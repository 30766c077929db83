"""A Ctrl-C that lands while a step's telemetry is being delivered loses nothing: every
collector gets the whole step, and the KeyboardInterrupt comes right after."""

import os
import signal
import threading

import pytest

import hooks
from hooks.interrupts import deferred_sigint


class _InterruptMidWrite:
    """Sends SIGINT to this process half way through its first write."""

    def __init__(self):
        self.events = []
        self.fired = False

    def handle(self, events):
        for i, e in enumerate(events):
            if i == 1 and not self.fired:
                self.fired = True
                os.kill(os.getpid(), signal.SIGINT)
                # Python runs handlers between bytecodes: give it many chances to raise here
                sum(range(10_000))
            self.events.append(e)


class _Plain:
    def __init__(self):
        self.events = []

    def handle(self, events):
        self.events.extend(events)


def test_ctrl_c_inside_delivery_is_raised_after_every_collector_got_the_step():
    bus = hooks.Bus()
    first, second = _InterruptMidWrite(), _Plain()
    bus.subscribe(first, "user/*")
    bus.subscribe(second, "user/*")
    bus.begin_step(0)
    for i in range(5):
        bus.emit(f"user/v{i}", float(i))
    with pytest.raises(KeyboardInterrupt):
        bus.end_step()
    assert first.fired
    assert [e.value for e in first.events] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [e.value for e in second.events] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_deferred_sigint_without_a_signal_changes_nothing():
    with deferred_sigint():
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_deferred_sigint_keeps_a_custom_handler_and_an_ignored_sigint():
    seen = []
    old = signal.signal(signal.SIGINT, lambda s, f: seen.append(s))
    try:
        with deferred_sigint():
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(10_000))
            assert not seen  # held back
        assert seen == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with deferred_sigint():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_deferred_sigint_off_the_main_thread_is_a_no_op():
    errors = []

    def work():
        try:
            with deferred_sigint():
                pass
        except Exception as exc:  # signal.signal off the main thread raises ValueError
            errors.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert not errors
