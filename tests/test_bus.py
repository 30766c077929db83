"""The hook bus: patterns, sampling, batching, fault isolation, bounds."""

import pytest
import torch

import hooks
from tests.helpers import Recorder


def test_topic_patterns_route_by_family():
    bus = hooks.Bus()
    muon, timing, every = Recorder(), Recorder(), Recorder()
    bus.subscribe(muon, "muon/*")
    bus.subscribe(timing, ["time/*", "step/time_ms"])
    bus.subscribe(every, "*")
    bus.begin_step(0)
    bus.emit("muon/ns_residual", 0.5, param="w")
    bus.emit("grad/norm", 1.0)
    bus.emit("time/muon/newton_schulz", 2.0)
    bus.emit("step/time_ms", 3.0)
    bus.end_step()
    assert muon.topics() == ["muon/ns_residual"]
    assert sorted(timing.topics()) == ["step/time_ms", "time/muon/newton_schulz"]
    assert len(every.events) == 4


def test_subscription_remove_stops_delivery_and_wants():
    bus = hooks.Bus()
    rec = Recorder()
    sub = bus.subscribe(rec, "grad/*")
    bus.begin_step(0)
    assert bus.wants("grad/norm")
    sub.remove()
    assert not bus.wants("grad/norm")
    bus.emit("grad/norm", 1.0)
    bus.end_step()
    assert rec.events == []


def test_wants_false_without_listener_or_on_unsampled_step():
    bus = hooks.Bus(every=3)
    bus.begin_step(0)
    assert not bus.wants("grad/norm")  # nobody listens
    bus.end_step()
    bus.subscribe(Recorder(), "*")
    sampled = []
    for step in range(6):
        bus.begin_step(step)
        sampled.append(bus.wants("grad/norm"))
        bus.end_step()
    assert sampled == [True, False, False, True, False, False]


def test_bare_bus_samples_every_step_driven_by_hand():
    bus = hooks.Bus()
    rec = Recorder()
    bus.subscribe(rec)
    for step in range(4):
        bus.begin_step(step)
        bus.emit("grad/norm", float(step))
        bus.end_step()
    assert [e.step for e in rec.events] == [0, 1, 2, 3]
    assert rec.values("grad/norm") == [0.0, 1.0, 2.0, 3.0]


def test_one_host_transfer_per_step_for_many_tensor_values():
    bus = hooks.Bus()
    rec = Recorder()
    bus.subscribe(rec)
    for step in range(3):
        bus.begin_step(step)
        for i in range(50):
            bus.emit("grad/norm", torch.tensor(float(i)), param=f"p{i}")
        bus.emit_each("update/norm", torch.arange(4.0), [{"param": f"q{i}"} for i in range(4)])
        bus.emit("grad/hist", torch.arange(7.0), param="p0")
        bus.end_step()
        assert bus.host_transfers == step + 1
    last = [e for e in rec.events if e.step == 2]
    assert sorted(e.value for e in last if e.topic == "grad/norm") == [float(i) for i in range(50)]
    assert {e.tags["param"]: e.value for e in last if e.topic == "update/norm"} == \
        {"q0": 0.0, "q1": 1.0, "q2": 2.0, "q3": 3.0}
    assert [e.value for e in last if e.topic == "grad/hist"] == [[float(i) for i in range(7)]]


def test_no_tensor_is_read_one_by_one(monkeypatch):
    bus = hooks.Bus()
    bus.subscribe(Recorder())

    def forbidden(self):
        raise AssertionError(".item() called on an emitted tensor")

    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    bus.begin_step(0)
    for i in range(10):
        bus.emit("grad/norm", torch.tensor(float(i)), param=str(i))
    bus.end_step()


def test_raising_collector_is_isolated_counted_and_reported_once(capsys):
    class Broken:
        name = "Broken"

        def handle(self, events):
            raise OSError(28, "No space left on device")

    bus = hooks.Bus()
    good = Recorder()
    bus.subscribe(Broken())
    bus.subscribe(good)
    for step in range(3):
        bus.begin_step(step)
        bus.emit("grad/norm", float(step))
        bus.end_step()
    assert good.values("grad/norm") == [0.0, 1.0, 2.0]
    assert bus.collector_errors == 3
    # the count itself is delivered as telemetry
    assert good.values("probe/collector_errors")[-1] >= 2.0
    err = capsys.readouterr().err
    assert err.count("collector Broken failed") == 1


def test_overflow_is_counted_not_silent():
    bus = hooks.Bus(max_pending=5)
    rec = Recorder()
    bus.subscribe(rec)
    bus.begin_step(0)
    for i in range(12):
        bus.emit("grad/norm", float(i), param=str(i))
    bus.end_step()
    assert len([e for e in rec.events if e.topic == "grad/norm"]) == 5
    assert bus.dropped_events == 7
    assert rec.values("probe/dropped_events") == [7.0]


def test_alarm_topic_delivered_on_unsampled_step_only_when_it_fires():
    bus = hooks.Bus(every=10)
    rec = Recorder()
    bus.subscribe(rec)
    for step in range(1, 4):
        bus.begin_step(step)
        assert not bus.sampled
        assert bus.wants("anomaly/nonfinite")
        bus.emit("anomaly/nonfinite", torch.tensor(float(step == 2)), param="w")
        bus.emit("grad/norm", 1.0)
        bus.end_step()
    assert [(e.step, e.value) for e in rec.events] == [(2, 1.0)]


def test_span_times_block_and_is_free_when_unwanted():
    bus = hooks.Bus()
    assert bus.span("muon/newton_schulz") is hooks.bus.NULL_SPAN
    rec = Recorder()
    bus.subscribe(rec, "time/*")
    bus.begin_step(0)
    with bus.span("muon/newton_schulz", param="w"):
        torch.randn(64, 64) @ torch.randn(64, 64)
    bus.end_step()
    (ev,) = rec.events
    assert ev.topic == "time/muon/newton_schulz" and ev.tags == {"param": "w"}
    assert 0.0 < ev.value < 1000.0


def test_strict_bus_rejects_undeclared_topics():
    bus = hooks.Bus(strict=True)
    with pytest.raises(KeyError, match="not declared"):
        bus.emit("nonsense/topic", 1.0)
    assert hooks.topics.is_declared("time/anything/nested")
    assert hooks.topics.is_declared("user/my_metric")
    assert not hooks.topics.is_declared("time/")


def test_close_flushes_and_closes_collectors():
    bus = hooks.Bus()
    rec = Recorder()
    bus.subscribe(rec)
    bus.begin_step(0)
    bus.emit("train/loss", torch.tensor(0.25))
    bus.close()
    assert rec.values("train/loss") == [0.25]
    assert rec.closed


@pytest.mark.parametrize("kwargs,match", [
    ({"every": 0}, "every"), ({"every": 1.5}, "every"), ({"max_pending": 0}, "max_pending"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hooks.Bus(**kwargs)


def test_subscribe_validates():
    bus = hooks.Bus()
    with pytest.raises(ValueError, match="collector"):
        bus.subscribe(object())
    with pytest.raises(ValueError, match="topics"):
        bus.subscribe(Recorder(), [])


@pytest.mark.cuda
def test_cuda_values_and_spans_resolve_without_sync():
    bus = hooks.Bus(device="cuda")
    rec = Recorder()
    bus.subscribe(rec)
    x = torch.randn(512, 512, device="cuda")
    bus.begin_step(0)
    with bus.span("muon/newton_schulz"):
        y = x @ x
    bus.emit("grad/norm", y.norm())
    torch.cuda.set_sync_debug_mode("error")
    try:
        bus.end_step()  # a non-blocking copy and event queries only
    finally:
        torch.cuda.set_sync_debug_mode(0)
    bus.flush()
    assert rec.values("grad/norm")[0] == pytest.approx(y.norm().item(), rel=1e-5)
    assert rec.values("time/muon/newton_schulz")[0] > 0


def test_emit_each_takes_host_numbers_without_a_transfer():
    bus = hooks.Bus()
    rec = Recorder()
    bus.subscribe(rec)
    bus.begin_step(0)
    bus.emit_each("update/norm", [1, 2.5, 3.0], [{"param": f"q{i}"} for i in range(3)])
    bus.end_step()
    assert bus.host_transfers == 0
    assert {e.tags["param"]: e.value for e in rec.events} == {"q0": 1.0, "q1": 2.5, "q2": 3.0}
    assert all(type(e.value) is float for e in rec.events)


def test_each_collector_gets_its_own_list():
    class Greedy:
        def handle(self, events):
            events.clear()

    bus = hooks.Bus()
    rec = Recorder()
    bus.subscribe(Greedy())
    bus.subscribe(rec)
    bus.begin_step(0)
    bus.emit("grad/norm", 1.0)
    bus.end_step()
    assert rec.values("grad/norm") == [1.0]


def test_health_counts_reach_collectors_on_a_step_that_emits_nothing():
    class Broken:
        def handle(self, events):
            raise RuntimeError("boom")

    bus = hooks.Bus()
    good = Recorder()
    bus.subscribe(Broken(), "grad/*")
    bus.subscribe(good)
    bus.begin_step(0)
    bus.emit("grad/norm", 1.0)
    bus.end_step()  # Broken fails here, after the health check of this step
    bus.begin_step(1)
    bus.end_step()
    assert [(e.step, e.value) for e in good.events if e.topic == "probe/collector_errors"] \
        == [(1, 1.0)]


def test_alarms_still_get_in_when_ordinary_values_filled_the_buffer():
    bus = hooks.Bus(max_pending=5)
    rec = Recorder()
    bus.subscribe(rec)
    bus.begin_step(0)
    for i in range(12):
        bus.emit("grad/norm", float(i), param=str(i))
    bus.emit("anomaly/nonfinite", 1.0, param="fc.weight")  # after the flood
    bus.emit("anomaly/skipped_step", 1.0)
    for i in range(40):  # the alarms' room is bounded too
        bus.emit("anomaly/nonfinite", 1.0, param=f"p{i}")
    bus.end_step()
    assert rec.values("anomaly/nonfinite", "fc.weight") == [1.0]
    assert rec.values("anomaly/skipped_step") == [1.0]
    assert len([e for e in rec.events if e.topic == "grad/norm"]) == 5
    alarms = [e for e in rec.events if e.topic.startswith("anomaly/")]
    assert len(alarms) == 16  # max(16, 5 // 16) of room
    assert bus.dropped_events == 7 + 42 - 16


def test_samples_travel_as_one_vector_of_copies():
    """emit_samples: a vector collector gets one Vector of float32 CPU tensors, copied (the
    producer's tensor may change after the step), the others one Event per sample holding a
    list; the step's scalars share the one host transfer."""
    from hooks import Vector

    class VectorRecorder(Recorder):
        vectors = True

    bus = hooks.Bus()
    vec, ev = VectorRecorder(), Recorder()
    bus.subscribe(vec)
    bus.subscribe(ev)
    grad = torch.arange(12.0, dtype=torch.float64).view(3, 4)
    tags = [{"param": "a"}, {"param": "b"}]
    bus.begin_step(0)
    bus.emit("grad/norm", torch.tensor(2.0))
    bus.emit_samples("grad/hist", [grad.reshape(-1)[::3], torch.tensor([-1.0, 7.5])], tags)
    bus.end_step()
    grad.zero_()  # the gradient is rewritten by the next backward
    assert bus.host_transfers == 1
    (v,) = [r for r in vec.events if type(r) is Vector]
    assert v.topic == "grad/hist" and v.params == ["a", "b"]
    assert [t.dtype for t in v.values] == [torch.float32] * 2
    assert [t.tolist() for t in v.values] == [[0.0, 3.0, 6.0, 9.0], [-1.0, 7.5]]
    assert [(e.tags, e.value) for e in ev.events if e.topic == "grad/hist"] == [
        ({"param": "a"}, [0.0, 3.0, 6.0, 9.0]), ({"param": "b"}, [-1.0, 7.5])]
    assert ev.values("grad/norm") == [2.0]
    with pytest.raises(ValueError, match="samples and tags must have one length"):
        bus.emit_samples("grad/hist", [torch.zeros(2)], tags)
