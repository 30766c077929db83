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
