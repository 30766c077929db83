"""Verdicts: each documented healthy range warns when a run leaves it and stays quiet inside
it; ``probe report`` prints them; docs/dashboards.md documents every range."""

import json
import pathlib

import numpy as np
import pytest

from probe import verdicts
from probe.cli import main
from probe.records import clean

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _by_topic(rows):
    out = {}
    for topic, step, value, param in rows:
        rec, why = clean({"topic": topic, "step": step, "value": value,
                          "tags": {"param": param} if param else {}})
        assert rec is not None, why
        out.setdefault(topic, []).append(rec)
    return out


def _topics(found):
    return [v.topic for v in found]


def test_clean_run_has_no_warnings():
    rows = [("update/ratio", s, 1e-3, "w") for s in range(10)]
    rows += [("muon/ns_residual", s, 0.35, "w") for s in range(10)]
    rows += [("kfac/cond_A", s, 1e3, "fc") for s in range(10)]
    rows += [("kfac/clipped_A", 0, 5.0, "fc"), ("kfac/clipped_A", 9, 0.0, "fc")]
    rows += [("falcon/mask_sparsity", 9, 0.5, "c"), ("falcon/cos_raw_filtered", 9, 0.9, "c")]
    rows += [("anomaly/nonfinite", s, 0.0, None) for s in range(10)]
    assert verdicts.check(_by_topic(rows)) == []


@pytest.mark.parametrize("ratio,warn", [(1e-3, False), (2e-4, False), (5e-5, True),
                                        (8e-3, False), (3e-2, True)])
def test_update_ratio_median_of_second_half(ratio, warn):
    # a large first half (step 0 of Adam) does not count; the median over params is used
    rows = [("update/ratio", s, 0.5, p) for s in range(5) for p in ("a", "b", "c")]
    rows += [("update/ratio", s, ratio * f, p) for s in range(5, 10)
             for p, f in (("a", 0.5), ("b", 1.0), ("c", 400.0))]
    found = verdicts.check(_by_topic(rows))
    assert _topics(found) == (["update/ratio"] if warn else [])
    if warn:
        assert f"median {ratio:.2e}" in found[0].message


def test_ns_residual_and_conditioning_bounds():
    rows = [("muon/ns_residual", 3, 0.9, "big"), ("muon/ns_residual", 4, 0.59, "big"),
            ("muon/ns_residual", 4, 0.61, "w2")]
    rows += [("kfac/cond_G", 4, 6e5, "fc"), ("kfac/cond_A", 4, 4.9e5, "fc")]
    found = verdicts.check(_by_topic(rows))
    assert _topics(found) == ["muon/ns_residual", "kfac/cond_G"]
    assert found[0].tag == "w2" and "big" not in found[0].message  # its last value is fine
    # a smaller max_condition moves the bound
    assert _topics(verdicts.check(_by_topic(rows), max_condition=9e5)) == [
        "muon/ns_residual", "kfac/cond_A", "kfac/cond_G"]


def test_falcon_and_counters():
    rows = [("falcon/mask_sparsity", 2, 0.95, "c1"), ("falcon/cos_raw_filtered", 2, 0.2, "c1"),
            ("anomaly/nonfinite", 3, 1.0, None), ("anomaly/nonfinite", 3, 1.0, "fc.weight"),
            ("probe/dropped_events", 4, 7.0, None)]
    found = verdicts.check(_by_topic(rows))
    assert _topics(found) == ["anomaly/nonfinite", "probe/dropped_events",
                              "falcon/mask_sparsity", "falcon/cos_raw_filtered"]
    assert "first at step 3" in found[0].message and "fc.weight" in found[0].message


def _blocks(rel_b0):
    rows = []
    for s, (act, r0) in enumerate(rel_b0):
        rows.append(("blocks/active", s * 10, float(act), None))
        for i, p in enumerate(("b0", "b1", "b2")):
            rows.append(("blocks/relevance", s * 10, r0 if i == 0 else 1.0, p))
    return _by_topic(rows)


def test_frozen_block_whose_relevance_rises():
    # b0 frozen from step 10 (2 of 3 blocks active) at relevance 0.1, then 0.12, then 0.2
    rising = _blocks([(3, 0.05), (2, 0.1), (2, 0.12), (2, 0.2)])
    (v,) = verdicts.check(rising)
    assert v.tag == "b0" and "frozen since step 10" in v.message and "x2.00" in v.message
    # the same rise while the block trains is no warning, nor a small rise while frozen
    assert verdicts.check(_blocks([(3, 0.1), (3, 0.12), (3, 0.2), (2, 0.2)])) == []
    assert verdicts.check(_blocks([(3, 0.05), (2, 0.1), (2, 0.14)])) == []


def test_check_validates():
    with pytest.raises(TypeError, match="by_topic"):
        verdicts.check([])
    for bad in (1.0, 0, float("inf"), float("nan"), "1e6", True):
        with pytest.raises(ValueError, match="max_condition"):
            verdicts.check({}, max_condition=bad)


def test_every_range_is_documented():
    doc = (ROOT / "docs" / "dashboards.md").read_text()
    for r in verdicts.RANGES:
        assert f"| `{r.topic}` | {r.healthy} |" in doc, r.topic


def test_report_prints_warnings(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    lines = [{"topic": "step/time_ms", "step": s, "value": 1.0, "tags": {}} for s in range(4)]
    lines += [{"topic": "kfac/cond_A", "step": s, "value": float(10 ** (s + 3)),
               "tags": {"param": "fc"}} for s in range(4)]
    (run / "events.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "warning: kfac/cond_A: fc 1e+06 at the last sample" in out
    assert main(["report", str(run), "--max-condition", "1e7"]) == 0
    assert "no warnings" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--max-condition must be"):
        main(["report", str(run), "--max-condition", "1"])
    assert np.isfinite(verdicts.DEFAULT_MAX_CONDITION)
