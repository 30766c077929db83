"""TensorBoard and JSON-lines collectors, read back with independent readers."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dashboards import JSONLines, Summary, TensorBoard, read_events
from hooks import Event


def _events():
    return [
        Event("grad/norm", 0, 1.5, {"param": "fc.weight"}, 1.0),
        Event("grad/norm", 0, 2.5, {}, 1.0),
        Event("grad/hist", 0, [0.1, -0.2, 0.3, 0.5], {"param": "fc.weight"}, 1.0),
        Event("muon/routing", 0, "| name | route |", {}, 1.0),
        Event("grad/norm", 1, float("nan"), {}, 2.0),
    ]


def test_tensorboard_writes_scalars_histograms_text(tmp_path):
    tb = TensorBoard(tmp_path)
    tb.handle(_events())
    tb.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0, "scalars": 0,
                                                         "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"grad/norm/fc.weight", "grad/norm"} <= set(tags["scalars"])
    assert [s.value for s in acc.Scalars("grad/norm/fc.weight")] == [1.5]
    assert "grad/hist/fc.weight" in tags["histograms"]
    assert acc.Histograms("grad/hist/fc.weight")[0].histogram_value.num == 4
    assert any(t.startswith("muon/routing") for t in tags["tensors"])


def test_jsonlines_whole_lines_and_reader(tmp_path):
    path = tmp_path / "events.jsonl"
    jl = JSONLines(path)
    jl.handle(_events()[:3])
    jl.handle(_events()[3:])
    jl.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 5
    first = json.loads(lines[0])
    assert first == {"topic": "grad/norm", "step": 0, "value": 1.5,
                     "tags": {"param": "fc.weight"}, "wall_time": 1.0}
    good, bad = read_events(path)
    assert len(good) == 5 and bad == []
    assert good[4]["value"] != good[4]["value"]  # NaN read back as NaN


def test_reader_reports_corrupt_lines_and_keeps_the_rest(tmp_path):
    path = tmp_path / "events.jsonl"
    good_line = json.dumps({"topic": "grad/norm", "step": 0, "value": 1.0, "tags": {}})
    path.write_text(good_line + "\n{not json\n" + json.dumps([1, 2]) + "\n" + good_line
                    + "\n" + good_line[:10])
    good, bad = read_events(path)
    assert len(good) == 2
    assert [n for n, _ in bad] == [2, 3, 5]


def test_summary_aggregates():
    s = Summary()
    s.handle(_events())
    r = s.result()
    assert r["grad/norm"]["count"] == 2 and r["grad/norm"]["nonfinite"] == 1
    assert r["grad/norm"]["mean"] == pytest.approx(2.5)
    assert r["muon/routing"]["last"] == "| name | route |"


def test_event_files_of_one_folder_sort_in_creation_order(tmp_path):
    # TensorBoard reads event files in name order; a resumed run must come after the first
    from dashboards.event_writer import _event_file

    made = []
    for _ in range(30):
        tb = TensorBoard(tmp_path)
        made.append(_event_file(tb.writer).rsplit("/", 1)[-1])
        tb.close()
    assert sorted(made) == made


def test_event_records_are_framed_as_tensorboard_frames_them():
    """The C CRC framing equals tensorboard's own RecordWriter byte for byte."""
    import io

    from tensorboard.summary.writer.record_writer import RecordWriter

    from dashboards.event_writer import frame

    for data in (b"", b"x", bytes(range(256)) * 41):
        buf = io.BytesIO()
        RecordWriter(buf).write(data)
        assert frame(data) == buf.getvalue()


def test_histograms_are_written_as_their_buckets_in_both_files(tmp_path):
    """JSON lines and TensorBoard hold the same 30 buckets, numpy's histogram of the finite
    values; an all-NaN sample is written as null (no buckets)."""
    import numpy as np

    rng = np.random.default_rng(0)
    sample = rng.normal(size=1024).tolist() + [float("nan"), float("inf")]
    events = [Event("grad/hist", 0, sample, {"param": "w"}, 1.0),
              Event("grad/hist", 1, [float("nan")] * 3, {"param": "w"}, 2.0)]
    jl = JSONLines(tmp_path / "events.jsonl")
    jl.handle(events)
    jl.close()
    tb = TensorBoard(tmp_path)
    tb.handle(events)
    tb.close()
    (rec, empty), bad = read_events(tmp_path / "events.jsonl")
    assert not bad and empty["value"] is None
    finite = np.asarray(sample[:1024])
    counts, edges = np.histogram(finite, bins=30)
    h = rec["value"]
    assert h["counts"] == counts.tolist() and h["num"] == 1024
    np.testing.assert_allclose(h["limits"], edges[1:])
    assert (h["min"], h["max"]) == (finite.min(), finite.max())
    assert h["sum_squares"] == pytest.approx(float(finite @ finite))
    assert len((tmp_path / "events.jsonl").read_text().splitlines()[0]) < 2000
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    acc.Reload()
    (only,) = acc.Histograms("grad/hist/w")  # the all-NaN step has nothing to show
    assert list(only.histogram_value.bucket) == h["counts"]
    np.testing.assert_allclose(list(only.histogram_value.bucket_limit), h["limits"])


def _numpy_buckets(values):
    """np.histogram of the finite values over (min, max), as the collectors store it; one
    bucket where numpy cannot make 30 distinct edges (it raises)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if not v.size:
        return None
    lo, hi = float(v.min()), float(v.max())
    try:
        counts, edges = np.histogram(v, bins=30 if lo < hi else 1, range=(lo, hi))
    except ValueError:
        counts, edges = np.histogram(v, bins=1, range=(lo, hi))
    return {"min": lo, "max": hi, "num": int(v.size), "sum": float(v.sum()),
            "sum_squares": float(v @ v), "limits": edges[1:].tolist(),
            "counts": counts.tolist()}


def test_batched_buckets_equal_numpy_histogram_sample_by_sample():
    """bins_many buckets 1,800 samples in one pass; each equals np.histogram of that sample
    alone: values on the edges (of a far-off span too) and an ULP off them, equal values,
    NaN/Inf, all-NaN, empty, subnormal and 1e300 spans, spans of a few ULPs, float32 values;
    lists and tensors."""
    import numpy as np

    from dashboards.histograms import bins_many

    rng = np.random.default_rng(1)
    edges = np.linspace(-1, 1, 31)
    kinds = [
        lambda n: rng.normal(size=n),
        lambda n: np.full(n, rng.normal()),
        lambda n: edges[rng.integers(0, 31, size=n)],
        lambda n: rng.normal(size=n) * 1e-300,
        lambda n: np.concatenate([rng.normal(size=n), [np.nan, np.inf, -np.inf]]),
        lambda n: np.full(n, np.nan),
        lambda n: np.array([5e-324, 1e-323, 0.0])[: n % 3 + 1],
        lambda n: rng.integers(-3, 4, size=n).astype(float),
        lambda n: rng.normal(size=n) * 1e300,
        lambda n: 1.0 + np.arange(n % 40) * 2.2e-16,
        # on the edges of a far-off span, and one ULP either side of them (max |v| / span
        # ~ 1e9: where the index formula drifts from the edges the most)
        lambda n: np.linspace(1e6, 1e6 + 1e-3, 31)[np.r_[0, 30, rng.integers(0, 31, size=n)]],
        lambda n: np.nextafter(np.linspace(-7.0, 3.0, 31)[rng.integers(0, 31, size=n)],
                               rng.choice([-np.inf, np.inf], size=n)),
    ]
    samples = []
    for i in range(1800):
        s = kinds[i % len(kinds)](int(rng.integers(0, 1500)))
        samples.append(s.astype(np.float32).tolist() if i % 2 else s.tolist())
    with np.errstate(over="ignore"):
        want = [_numpy_buckets(s) for s in samples]
    got = bins_many(samples)
    assert sum(w is None for w in want) > 100
    for s, g, w in zip(samples, got, want):
        assert (g is None) == (w is None)
        if w is None:
            continue
        assert {k: g[k] for k in ("min", "max", "num", "limits", "counts")} == \
            {k: w[k] for k in ("min", "max", "num", "limits", "counts")}
        scale = float(np.abs(np.asarray(s, dtype=np.float64)[np.isfinite(s)]).sum())
        assert g["sum"] == pytest.approx(w["sum"], rel=1e-12, abs=1e-13 * scale + 1e-300)
        assert g["sum_squares"] == pytest.approx(w["sum_squares"], rel=1e-12)
    assert bins_many([]) == []
    # the bus's samples are CPU tensors (float32; any dtype here), flattened by torch
    import torch

    tensors = [torch.tensor(s, dtype=torch.float32 if i % 2 else torch.float64)
               for i, s in enumerate(samples)]
    assert bins_many(tensors) == got
    half = torch.randn(500).to(torch.bfloat16)
    assert bins_many([half, half[:7]]) == bins_many([half.double().tolist(),
                                                     half[:7].double().tolist()])


def test_writers_of_one_step_bucket_its_samples_once(tmp_path, monkeypatch):
    """TensorBoard and JSON lines receive the same histogram Vector; the buckets are computed
    once for both (on a 2-core machine the second pass competed with training)."""
    import torch

    import dashboards.histograms as H
    from hooks import Vector

    calls = []
    real = H.bins_many
    monkeypatch.setattr(H, "bins_many", lambda s: calls.append(len(s)) or real(s))
    samples = [torch.randn(64), torch.tensor([1.0, float("nan")])]
    v = Vector("grad/hist", 0, samples, ["a", "b"], {}, 1.0)
    tb, jl = TensorBoard(tmp_path), JSONLines(tmp_path / "events.jsonl")
    tb.handle([v])
    jl.handle([v])
    tb.close()
    jl.close()
    assert calls == [2]
    (line,) = (tmp_path / "events.jsonl").read_text().splitlines()
    assert json.loads(line)["values"][1]["counts"] == [1]
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    acc.Reload()
    assert sorted(acc.Tags()["histograms"]) == ["grad/hist/a", "grad/hist/b"]


@pytest.mark.parametrize("step,wall", [(0, 0.0), (7, 1.5), (2**40 + 3, 1796650000.123)])
def test_template_records_equal_protobufs_own_bytes(step, wall):
    """A per-parameter Vector's scalars filled into a template are the bytes protobuf
    serializes for the same Event: NaN, infinities, -0.0, values past float32, long tags."""
    from tensorboard.compat.proto.event_pb2 import Event as EventProto
    from tensorboard.compat.proto.summary_pb2 import Summary

    from dashboards.event_bytes import ScalarBlock, event_record

    tags = ["grad/norm/a", "grad/norm/" + "x" * 300, "grad/norm/é", "grad/norm/b"]
    values = [float("nan"), float("-inf"), -0.0, 1e39]
    want = EventProto(wall_time=wall, step=step, summary=Summary(
        value=[Summary.Value(tag=t, simple_value=v) for t, v in zip(tags, values)]))
    block = ScalarBlock(tags)
    got = event_record(wall, step, block.fill(values))
    assert got == want.SerializeToString()
    assert event_record(wall, step, block.fill([1.0, 2.0, 3.0, 4.0])) == EventProto(
        wall_time=wall, step=step, summary=Summary(value=[
            Summary.Value(tag=t, simple_value=v) for t, v in zip(tags, [1, 2, 3, 4])])
    ).SerializeToString()
