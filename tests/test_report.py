"""``probe report`` and ``probe tensorboard`` on real demo runs and on synthetic telemetry."""

import json
import urllib.parse
import urllib.request

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg

import hooks
from dashboards import JSONLines, read_events
from hooks import topics
from probe.cli import main
from probe.report import load_runs
from probe.tensorboard_cmd import start, stop

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        assert main(["demo", "--optimizer", "adamw", "--steps", "30", "--every", "5",
                     "--batch", "32", "--runs", str(root), "--name", f"s{seed}",
                     "--seed", str(seed), "--no-progress"]) == 0
    return root / "s0-adamw", root / "s1-adamw"


def _records(path):
    return read_events(path)[0]


def _check_png(path, min_bytes=8000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, (path, len(data))
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.02  # not a blank canvas


def test_report_two_demo_runs_tables_and_pngs(demo_runs, tmp_path, capsys):
    a, b = demo_runs
    plots = tmp_path / "plots"
    assert main(["report", str(a), str(b), "--plots", str(plots)]) == 0
    out = capsys.readouterr().out
    # the stamp-free labels head the columns; each block names its file
    assert out.splitlines()[0].split() == ["s0", "s1"]
    assert f"== s0  ({a / 'events.jsonl'})" in out
    # independent check of the figures in the side-by-side table, from the raw JSON lines
    for col, run in enumerate((a, b)):
        recs = _records(run / "events.jsonl")
        acc = [r["value"] for r in recs if r["topic"] == "eval/accuracy"]
        st = [r["value"] for r in recs if r["topic"] == "step/time_ms"]
        rows = {ln[:26].strip(): ln[26:].split() for ln in out.splitlines()[:16]}
        assert float(rows["final accuracy"][col]) == pytest.approx(acc[-1], rel=1e-3)
        assert float(rows["best accuracy"][col]) == pytest.approx(max(acc), rel=1e-3)
        assert float(rows["step ms median"][col]) == pytest.approx(np.median(st), rel=1e-3)
        assert float(rows["step ms p95"][col]) == pytest.approx(np.percentile(st, 95), rel=1e-3)
        assert rows["events / bad lines"][col] == f"{len(recs)}/0"
    for name in ("quality_vs_time.png", "time_to_target.png", "diagnostics_updates.png"):
        _check_png(plots / name)
    # nothing of Muon's was emitted, and AdamW times no stage inside its step
    assert not (plots / "diagnostics_muon.png").exists()
    assert not (plots / "stage_times.png").exists()


def test_report_truncated_and_corrupt_file(demo_runs, tmp_path, capsys):
    lines = (demo_runs[0] / "events.jsonl").read_text().splitlines(keepends=True)
    k = len(lines) // 2
    assert k > 40
    run = tmp_path / "broken"
    run.mkdir()
    body = lines[:40] + ["{not json at all\n", "[1, 2, 3]\n"] + lines[40:k]
    body.append(lines[k][:25])  # killed mid-write: a partial last line
    (run / "events.jsonl").write_text("".join(body))
    assert main(["report", str(run)]) == 0
    cap = capsys.readouterr()
    assert "3 bad line(s) skipped: line 41: not JSON" in cap.out
    assert "line 42: missing topic/step/value" in cap.out and f"line {k + 3}: not JSON" in cap.out
    assert "3 bad line(s)/record(s) skipped, first: line 41" in cap.err
    whole = tmp_path / "whole.jsonl"
    whole.write_text("".join(lines[:k]))
    good = read_events(whole)[0]
    (r,) = load_runs([str(run)])
    assert len(r.records) == len(good)
    loss = [g["value"] for g in good if g["topic"] == "train/loss"]
    assert r.series("train/loss")[2].tolist() == pytest.approx(loss)
    row = next(ln for ln in cap.out.splitlines() if ln.startswith("final train loss"))
    assert float(row.split()[-1]) == pytest.approx(loss[-1], rel=1e-3)


def _synthetic(path, family):
    """A run whose optimizer family emits known values; returns them for the checks."""
    bus = hooks.Bus()
    bus.subscribe(JSONLines(path / "events.jsonl"), "*")
    g = torch.Generator().manual_seed(3)
    vals = torch.rand(6, 2, generator=g)
    for s in range(6):
        bus.begin_step(s)
        bus.emit("step/time_ms", 10.0 + s)
        bus.emit(f"time/{family}/stage", 2.0 + (s % 2))
        bus.emit("train/loss", 2.0 / (s + 1))
        for i, p in enumerate(("w1", "w2")):
            topic = "muon/ns_residual" if family == "muon" else "falcon/retained_energy"
            bus.emit(topic, vals[s, i], param=p)
        bus.end_step()
    bus.close()
    return vals.numpy().astype(np.float64)


def test_report_family_diagnostics_against_numpy(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "f").mkdir()
    vm = _synthetic(tmp_path / "m", "muon")
    vf = _synthetic(tmp_path / "f", "falcon")
    plots = tmp_path / "plots"
    assert main(["report", str(tmp_path), "--plots", str(plots)]) == 0
    out = capsys.readouterr().out
    for topic, v in (("muon/ns_residual", vm), ("falcon/retained_energy", vf)):
        row = next(ln for ln in out.splitlines() if ln.strip().startswith(topic)).split()
        assert row[1] == topics.lookup(topic).unit
        last, mn, mx, ntags = map(float, row[2:6])
        assert last == pytest.approx(np.median(v[-1]), rel=1e-3)
        assert (mn, mx) == (pytest.approx(v.min(), rel=1e-3), pytest.approx(v.max(), rel=1e-3))
        assert ntags == 2
    stage = next(ln for ln in out.splitlines() if ln.strip().startswith("muon/stage")).split()
    # amortized: the stage's total over the timed steps, and that total over the step total
    assert float(stage[1]) == pytest.approx(np.mean([2, 3, 2, 3, 2, 3]))
    assert stage[2] == f"{100 * 15 / np.sum(10.0 + np.arange(6)):.1f}%"
    assert int(stage[3]) == 6
    ttt = next(ln for ln in out.splitlines() if ln.startswith("s to train/loss"))
    assert ttt.split()[3] == f"{1.05 * 2.0 / 6:.4g}"  # default target: every run reaches it
    for name in ("diagnostics_muon.png", "diagnostics_falcon.png", "stage_times.png"):
        _check_png(plots / name, min_bytes=5000)


def test_report_rejects_missing_run(tmp_path):
    with pytest.raises(SystemExit, match="RUN_DIR .* does not exist"):
        main(["report", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="holds no events.jsonl"):
        main(["report", str(tmp_path)])


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_tensorboard_server_serves_layout_and_scalars(demo_runs):
    run = demo_runs[0]
    proc, url = start(run, host="127.0.0.1", port=0, timeout=60)
    try:
        assert url.startswith("http://127.0.0.1:")
        runs = _get(url + "data/plugin/scalars/tags")
        assert set(runs) == {run.name}  # a lone run folder keeps its name, not "."
        tags = runs[run.name]
        assert {"step/time_ms", "grad/norm", "eval/accuracy", "train/loss"} <= set(tags)
        layout = _get(url + "data/plugin/custom_scalars/layout")
        cats = {c["title"]: c for c in layout["category"]}
        assert set(cats) == {"Step", "Training", "Updates", "Health"}  # AdamW: no family
        for cat in layout["category"]:
            for ch in cat["chart"]:
                for rx in ch["multiline"]["tag"]:
                    assert rx[1:-1].replace("\\", "") in tags, rx
        q = urllib.parse.urlencode({"run": run.name, "tag": "grad/norm"})
        series = _get(url + "data/plugin/scalars/scalars?" + q)
        recs = _records(run / "events.jsonl")
        want = [(r["step"], r["value"]) for r in recs
                if r["topic"] == "grad/norm" and not r["tags"]]
        assert [(s, v) for _, s, v in series] == [(s, pytest.approx(v, rel=1e-6))
                                                  for s, v in want]
        assert len(want) == 6
        req = urllib.request.Request(url + "data/plugin/hparams/experiment",
                                     data=json.dumps({"experimentName": ""}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            exp = json.loads(r.read())
        assert {h["name"] for h in exp["hparamInfos"]} == {"optimizer", "lr", "steps", "batch",
                                                           "every", "seed"}
        metrics = {m["name"]["tag"] for m in exp["metricInfos"]}
        assert metrics == {"eval/accuracy", "eval/loss", "train/loss"}
    finally:
        stop(proc)
    assert proc.returncode is not None


def test_tensorboard_start_validates(tmp_path):
    with pytest.raises(ValueError, match="RUN_DIR"):
        start(tmp_path / "nope")
    with pytest.raises(ValueError, match="port must be"):
        start(tmp_path, port=70000)


def _tiny_run(path):
    path.mkdir(parents=True, exist_ok=True)
    lines = [{"topic": "eval/accuracy", "step": s, "value": 0.5 + 0.1 * s, "tags": {},
              "wall_time": 1e9 + s} for s in range(4)]
    (path / "events.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_report_errors_are_one_line_and_nonzero(tmp_path, capsys):
    run = _tiny_run(tmp_path / "run")
    notrun = tmp_path / "notes.txt"
    notrun.write_text("# a README, not a run\nhello\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "events.jsonl").write_text("")
    for args, msg in (
            ([str(notrun)], "no usable events in"),
            ([str(empty)], "no usable events in"),
            ([str(run), "--plots", str(notrun)], "--plots .* is a file, not a folder"),
            ([str(run), "--plots", str(notrun / "sub")], "--plots .* cannot be created"),
            ([str(run), "--target", "nan"], "--target must be a finite number")):
        with pytest.raises(SystemExit, match=msg) as exc:
            main(["report", *args])
        assert "\n" not in str(exc.value.code)  # one line, and a non-zero status (a message)
        # nothing was printed before the error: checked before any work
        assert capsys.readouterr().out == ""
    # a non-run next to a run is left out with a note; the run is reported
    assert main(["report", str(run), str(notrun)]) == 0
    cap = capsys.readouterr()
    assert "has no usable events, left out" in cap.err and "== run" in cap.out


def test_report_unreachable_target_says_so(tmp_path, capsys):
    run = _tiny_run(tmp_path / "run")
    assert main(["report", str(run), "--target", "0.99"]) == 1
    cap = capsys.readouterr()
    row = next(ln for ln in cap.out.splitlines() if ln.startswith("s to eval/accuracy"))
    assert row.split()[-1] == "never"
    assert cap.err.strip() == "probe report: no run reaches --target 0.99 on eval/accuracy"
    assert main(["report", str(run), "--target", "0.7"]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines()
               if ln.startswith("s to eval/accuracy"))
    assert float(row.split()[-1]) == pytest.approx(2.0)  # 0.5, 0.6, 0.7 at 1e9 + 2
