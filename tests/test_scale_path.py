"""The columnar path at model scale: a per-parameter statistic travels as one Vector per
(topic, step); TensorBoard and JSON lines hold the same values as the per-event path; a
sampled step costs O(topics) writer calls, not O(topics x tensors); ``per=`` aggregates."""

import json

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import hooks
import probe
from dashboards import JSONLines, Summary, TensorBoard, read_events
from hooks import Event, Vector
from probe.stats import STAT_ROWS
from tests.benchmarks.scale_models import Transformer, transformer_batch
from tests.helpers import Recorder


class VectorRecorder(Recorder):
    vectors = True


def _transformer():
    torch.manual_seed(0)
    return Transformer(layers=12, d=32, heads=2, vocab=64, context=16)


def _steps(model, opt, n, seed=0):
    x, y = transformer_batch(4, context=16, vocab=64, seed=seed)
    for _ in range(n):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_vectors_reach_opted_in_collectors_and_events_the_rest():
    bus = hooks.Bus()
    vec, ev = VectorRecorder(), Recorder()
    bus.subscribe(vec, "*")
    bus.subscribe(ev, "*")
    tags = [{"param": f"p{i}"} for i in range(4)]
    bus.begin_step(3)
    bus.emit_each("grad/norm", torch.tensor([1.0, 2.0, 3.0, 4.0]), tags)
    bus.emit("grad/norm", 5.0)
    bus.end_step()
    (v,) = [r for r in vec.events if type(r) is Vector]
    assert (v.topic, v.step, v.values, v.params) == ("grad/norm", 3, [1.0, 2.0, 3.0, 4.0],
                                                     ["p0", "p1", "p2", "p3"])
    assert all(type(e) is Event for e in ev.events)
    assert sorted((e.tags.get("param") or "", e.value) for e in ev.events) == \
        [("", 5.0), ("p0", 1.0), ("p1", 2.0), ("p2", 3.0), ("p3", 4.0)]
    assert v.events() == [e for e in ev.events if e.tags]


def test_mixed_tags_fall_back_to_events_and_quiet_alarms_keep_only_news():
    bus = hooks.Bus(every=2)
    vec = VectorRecorder()
    bus.subscribe(vec, "*")
    bus.begin_step(1)  # unsampled: a quiet alarm keeps only the non-zero entries
    bus.emit_each("anomaly/nonfinite", [0.0, 1.0, 0.0], [{"param": f"p{i}"} for i in range(3)])
    bus.emit_each("grad/norm", [1.0, 2.0], [{"param": "a"}, {"param": "b", "rank": 1}])
    bus.end_step()
    (alarm,) = [r for r in vec.events if r.topic == "anomaly/nonfinite"]
    assert type(alarm) is Vector and alarm.params == ["p1"] and alarm.values == [1.0]
    assert not [r for r in vec.events if r.topic == "grad/norm"]  # unsampled step
    bus.begin_step(2)
    bus.emit_each("grad/norm", [1.0, 2.0], [{"param": "a"}, {"param": "b", "rank": 1}])
    bus.end_step()
    mixed = [r for r in vec.events if r.topic == "grad/norm"]
    assert [type(r) for r in mixed] == [Event, Event]
    assert mixed[1].tags == {"param": "b", "rank": "1"}


def _run_files(tmp_path, vectors: bool):
    """The same probed training run written through the vector path or the per-event one."""
    logdir = tmp_path / ("vec" if vectors else "ev")
    tb, jl = TensorBoard(logdir), JSONLines(logdir / "events.jsonl")
    if not vectors:  # instance attributes shadow the class's: these get Events
        tb.vectors = jl.vectors = False
    model = _transformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with probe.attach(opt, model=model, every=2, collectors=[tb, jl]) as p:
        _steps(model, opt, 6)
        summary = p.summary()
    return logdir, summary


def test_tensorboard_and_json_lines_hold_what_the_event_path_wrote(tmp_path):
    vec_dir, vec_summary = _run_files(tmp_path, vectors=True)
    ev_dir, ev_summary = _run_files(tmp_path, vectors=False)
    assert vec_summary.keys() == ev_summary.keys()
    # JSON lines: one line per topic per step, read back as the per-event file's records
    lines = [json.loads(x) for x in (vec_dir / "events.jsonl").read_text().splitlines()]
    per_param = [r for r in lines if r["topic"] == "grad/norm" and "values" in r]
    assert len(per_param) == 3 and len(per_param[0]["params"]) > 100  # steps 0, 2, 4
    got, bad = read_events(vec_dir / "events.jsonl")
    want, _ = read_events(ev_dir / "events.jsonl")
    assert not bad

    def key(rs):
        return sorted((r["topic"], r["step"], r["tags"].get("param", ""),
                       json.dumps(r["value"])) for r in rs
                      if not r["topic"].startswith(("time/", "step/time", "probe/overhead")))
    assert key(got) == key(want)
    # TensorBoard's own reader: every tag of the event path, the same values
    accs = []
    for d in (vec_dir, ev_dir):
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0, "histograms": 0})
        acc.Reload()
        accs.append(acc)
    a, b = accs
    assert set(a.Tags()["scalars"]) == set(b.Tags()["scalars"])
    assert set(a.Tags()["histograms"]) == set(b.Tags()["histograms"])
    names = [n for n, _ in _transformer().named_parameters()]
    for row in STAT_ROWS:
        assert f"{row}/{names[5]}" in a.Tags()["scalars"]
    for tag in a.Tags()["scalars"]:
        if tag.startswith(("grad/", "param/", "update/")):
            np.testing.assert_array_equal([(s.step, s.value) for s in a.Scalars(tag)],
                                          [(s.step, s.value) for s in b.Scalars(tag)], tag)


class CountingWriter:
    """Stands in for the event-file writer and counts the records handed to it, as Summary
    protos or as serialized Events (the queue's ``write``)."""

    def __init__(self):
        self.calls = 0
        self.values = 0
        self.raw = 0
        queue = type("Queue", (), {"write": self._write})()
        self.event_writer = type("EventWriter", (), {"_async_writer": queue})()

    def add_summary(self, summary, step, walltime=None):
        self.calls += 1
        self.values += len(summary.value)

    def _write(self, data):
        from tensorboard.compat.proto.event_pb2 import Event

        self.calls += 1
        self.raw += 1
        self.values += len(Event.FromString(data).summary.value)


def test_a_sampled_step_makes_O_topics_writer_calls_not_O_tensors(tmp_path):
    model = _transformer()
    n = len(list(model.parameters()))
    assert n >= 144
    tb = TensorBoard(tmp_path)
    counter = CountingWriter()
    tb.writer._get_file_writer = lambda: counter
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with probe.attach(opt, model=model, every=1, histograms=False, collectors=[tb]):
        _steps(model, opt, 3)
        calls_per_step = counter.calls / 3
        values_per_step = counter.values / 3
    # one record per step (the layout once more at the first); the values are all there
    assert calls_per_step <= 2 and counter.raw == 3
    assert values_per_step >= len(STAT_ROWS) * n


def test_json_lines_write_one_line_per_topic_per_step(tmp_path):
    model = _transformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    jl = JSONLines(tmp_path / "e.jsonl")
    with probe.attach(opt, model=model, every=1, histograms=False, collectors=[jl]):
        _steps(model, opt, 2)
    lines = (tmp_path / "e.jsonl").read_text().splitlines()
    assert len(lines) < 40  # about 20 topics per step, not 5 x 150 parameter lines


def test_read_events_reads_old_and_new_lines_and_refuses_broken_vectors(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("\n".join([
        '{"topic":"grad/norm","step":0,"value":1.5,"tags":{"param":"a"},"wall_time":1.0}',
        '{"topic":"grad/norm","step":1,"values":[1.0,NaN],"params":["a","b"],'
        '"tags":{"rank":"0"},"wall_time":2.0,"run":"r1"}',
        '{"topic":"grad/norm","step":2,"values":[1.0],"params":["a","b"]}',
        '{"topic":"grad/norm","step":2,"values":[1.0],"params":["a"],"tags":[1]}',
    ]) + "\n")
    good, bad = read_events(path)
    assert [(r["step"], r["tags"], r.get("run")) for r in good] == [
        (0, {"param": "a"}, None), (1, {"rank": "0", "param": "a"}, "r1"),
        (1, {"rank": "0", "param": "b"}, "r1")]
    assert np.isnan(good[2]["value"])
    assert [n for n, _ in bad] == [3, 4]


def _module_reference(model, before, grads):
    """float64 norms over each module's parameters concatenated, from the test's own copies."""
    out = {}
    for name, p in model.named_parameters():
        mod = name.rsplit(".", 1)[0] if "." in name else name
        out.setdefault(mod, []).append((before[name].double().ravel(),
                                        p.detach().double().ravel(),
                                        grads[name].double().ravel()))
    ref = {}
    for mod, parts in out.items():
        b = torch.cat([x for x, _, _ in parts])
        a = torch.cat([x for _, x, _ in parts])
        g = torch.cat([x for _, _, x in parts])
        u = a - b
        ref[mod] = {"grad/norm": g.norm().item(), "param/norm": b.norm().item(),
                    "update/norm": u.norm().item(), "update/ratio": (u.norm() / b.norm()).item(),
                    "update/cos_grad": (torch.dot(-u, g) / (u.norm() * g.norm())).item()}
    return ref


def test_per_module_statistics_match_float64_norms_of_the_modules():
    model = _transformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = Recorder()
    x, y = transformer_batch(4, context=16, vocab=64)
    with probe.attach(opt, model=model, every=1, collectors=[rec], per="module"):
        nn.functional.cross_entropy(model(x), y).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    ref = _module_reference(model, before, grads)
    assert len(ref) < len(before)
    for mod, stats in ref.items():
        for topic, want in stats.items():
            (got,) = rec.values(topic, mod)
            assert got == pytest.approx(want, rel=2e-4, abs=1e-7), (mod, topic)
    assert not rec.values("grad/norm", "blocks.0.linear1.weight")  # no per-tensor values
    (total,) = rec.values("grad/norm")
    assert total == pytest.approx(np.sqrt(sum(s["grad/norm"] ** 2 for s in ref.values())),
                                  rel=1e-5)


def test_per_total_emits_only_the_model_wide_figures():
    model = _transformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = Recorder()
    with probe.attach(opt, model=model, every=1, collectors=[rec], per="total") as p:
        _steps(model, opt, 1)
        assert p.per == "total"
    assert {e.tags.get("param") for e in rec.events if e.topic in STAT_ROWS} == {None}
    assert len(rec.values("grad/norm")) == 1


@pytest.mark.parametrize("per", ["params", "", None, 1])
def test_per_is_validated(per):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="per must be one of"):
        probe.attach(opt, per=per)


def test_summary_from_vectors_equals_summary_from_events():
    a, b = Summary(), Summary()
    b.vectors = False
    bus_a, bus_b = hooks.Bus(), hooks.Bus()
    bus_a.subscribe(a, "*")
    bus_b.subscribe(b, "*")
    tags = [{"param": f"p{i}"} for i in range(3)]
    for step, vals in enumerate([[1.0, float("nan"), 3.0], [2.0, 5.0, -1.0]]):
        for bus in (bus_a, bus_b):
            bus.begin_step(step)
            bus.emit_each("grad/norm", torch.tensor(vals), tags)
            bus.end_step()
    ra, rb = a.result(), b.result()
    assert ra.keys() == rb.keys()
    for k in ra:
        assert json.dumps(ra[k], sort_keys=True) == json.dumps(rb[k], sort_keys=True)


def test_a_histogram_step_is_two_json_lines_and_one_record(tmp_path):
    """Step 0 samples every parameter twice (gradient and update): 300 histograms on this
    model, which arrive as two Vectors and leave as one line per topic and one Summary."""
    model = _transformer()
    n = len(list(model.parameters()))
    tb = TensorBoard(tmp_path)
    counter = CountingWriter()
    tb.writer._get_file_writer = lambda: counter
    jl = JSONLines(tmp_path / "e.jsonl")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with probe.attach(opt, model=model, every=1, collectors=[tb, jl]):
        _steps(model, opt, 1)
    lines = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    hist = [r for r in lines if r["topic"] in ("grad/hist", "update/hist")]
    assert len(hist) == 2 and all(len(r["values"]) == n for r in hist)
    assert counter.calls <= 2 and counter.values >= len(STAT_ROWS) * n + 2 * n
    good, bad = read_events(tmp_path / "e.jsonl")
    assert not bad
    grads = [r for r in good if r["topic"] == "grad/hist"]
    assert len(grads) == n and all(sum(r["value"]["counts"]) == r["value"]["num"] for r in grads)
