"""`probe demo --optimizer muon` end to end: Muon's telemetry lands in TensorBoard and JSONL."""


from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dashboards import read_events
from probe.cli import main


def test_demo_runs_muon_with_its_telemetry(tmp_path, capsys):
    rc = main(["demo", "--optimizer", "muon", "--steps", "12", "--every", "4",
               "--runs", str(tmp_path), "--name", "t", "--no-progress"])
    assert rc == 0
    assert "muon" in capsys.readouterr().out
    run = tmp_path / "t-muon"
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("muon/ns_residual/blocks.0.0.weight", "muon/sv_min/blocks.2.0.weight",
                "muon/sv_max/blocks.1.0.weight", "muon/ns_iters/blocks.2.0.weight",
                "muon/update_rms/head.weight", "time/muon/newton_schulz",
                "time/muon/fallback"):
        assert tag in scalars, tag
    assert len(acc.Scalars("muon/ns_residual/blocks.1.0.weight")) == 3  # steps 0, 4, 8
    recs = read_events(run / "events.jsonl")[0]
    routing = [r for r in recs if r["topic"] == "muon/routing"]
    assert len(routing) == 1
    table = routing[0]["value"]
    assert "head.weight" in table and "use_muon=False" in table and "coverage:" in table
    assert not any(r["topic"] == "muon/ns_residual" and r["tags"].get("param") == "head.weight"
                   for r in recs)
