"""The demo end to end: a short run whose event files TensorBoard's own reader loads."""


from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dashboards import read_events
from hooks import topics
from probe.cli import main


def test_demo_writes_runs_tensorboard_reads(tmp_path, capsys):
    rc = main(["demo", "--optimizer", "adamw", "--steps", "30", "--every", "5",
               "--runs", str(tmp_path), "--name", "t", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "adamw" in out and f"-m probe tensorboard {tmp_path}" in out
    run = tmp_path / "t-adamw"
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("step/time_ms", "grad/norm", "train/loss", "eval/accuracy",
                "grad/norm/head.weight", "update/ratio/head.weight"):
        assert tag in scalars, tag
    assert len(acc.Scalars("grad/norm")) == 6  # steps 0, 5, ..., 25
    recs, bad = read_events(run / "events.jsonl")
    assert not bad
    assert all(topics.is_declared(r["topic"]) for r in recs)
    assert sum(r["topic"] == "train/loss" for r in recs) == 30


def test_demo_rejects_unknown_optimizer(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="--optimizer"):
        main(["demo", "--optimizer", "nope", "--runs", str(tmp_path)])
