"""``probe demo --optimizer kfac``: the K-FAC run writes its conditioning telemetry."""


from dashboards import read_events
from hooks import topics
from probe.cli import main


def test_demo_kfac_writes_conditioning_telemetry(tmp_path, capsys):
    rc = main(["demo", "--optimizer", "kfac", "--steps", "12", "--every", "5",
               "--runs", str(tmp_path), "--name", "t", "--no-progress"])
    assert rc == 0
    assert "kfac" in capsys.readouterr().out
    recs = read_events(tmp_path / "t-kfac" / "events.jsonl")[0]
    assert all(topics.is_declared(r["topic"]) for r in recs)
    by_topic = {}
    for r in recs:
        by_topic.setdefault(r["topic"], []).append(r)
    layers = {"blocks.0.0", "blocks.1.0", "blocks.2.0", "head"}
    for topic in ("kfac/cond_A", "kfac/cond_G", "kfac/clipped_A", "kfac/clipped_G",
                  "kfac/tokens", "kfac/policy"):
        assert {r["tags"]["param"] for r in by_topic[topic]} == layers, topic
    # sampled steps 0, 5, 10: every layer reports on each
    assert sorted({r["step"] for r in by_topic["kfac/cond_A"]}) == [0, 5, 10]
    assert all(1.0 <= r["value"] <= 1e6 for r in by_topic["kfac/cond_A"])
    tokens = {r["tags"]["param"]: r["value"] for r in by_topic["kfac/tokens"]}
    assert tokens["head"] == 64 and tokens["blocks.0.0"] == 64 * 8 * 8
    assert {"time/kfac/factors", "time/kfac/eigh", "time/kfac/precondition"} <= set(by_topic)
