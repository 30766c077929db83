"""probe bench-table: the README's gate figures come from bench.json, not from typing."""

import json

import pytest

from probe import benchtable
from probe.cli import main


def _bench(name, label, ratio, max_ratio, cand, base, passed):
    return {"name": name, "fullname": f"tests/benchmarks/t.py::{name}", "stats": {},
            "extra_info": {"probe_gate_label": label, "probe_gate_ratio": ratio,
                           "probe_gate_max_ratio": max_ratio, "probe_gate_bound": max_ratio,
                           "probe_gate_slack": 1.0, "candidate_median_s": cand,
                           "baseline_median_s": base, "rounds": 25, "passed": passed}}


@pytest.fixture
def bench_json(tmp_path):
    data = {"machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2},
                             "python_version": "3.11.7"},
            "commit_info": {"id": "abcdef0123456789", "dirty": False},
            "datetime": "2026-01-01T00:00:00",
            "benchmarks": [
                _bench("test_b", "span cost", 1.5, 1.25, 0.003, 0.002, False),
                _bench("test_a", "", 1.02, 1.05, 0.0204, 0.02, True),
                {"name": "plain", "fullname": "x::plain", "extra_info": {}, "stats": {}},
            ]}
    p = tmp_path / "bench.json"
    p.write_text(json.dumps(data))
    return p


def test_table_has_one_row_per_gate_with_its_figures(bench_json, capsys):
    assert main(["bench-table", str(bench_json), "--command", "make bench PYTEST_ARGS=-x"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "| test_a | ≤ 1.05x | 1.020x | 20.4 | 20.0 | 25 | pass |"
    assert out[3] == "| span cost | ≤ 1.25x | 1.500x | 3.000 | 2.000 | 25 | **over bound** |"
    assert len([line for line in out if line.startswith("| ")]) == 3  # header + 2 gates
    assert "Test CPU (2 cores)" in out[-1] and "abcdef0123" in out[-1]
    assert "`make bench PYTEST_ARGS=-x`" in out[-1]


def test_update_rewrites_only_the_marked_block(bench_json, tmp_path):
    doc = tmp_path / "gates.md"
    doc.write_text(f"intro\n{benchtable.START}\nold figures\n{benchtable.END}\noutro\n")
    assert main(["bench-table", str(bench_json), "--update", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith(f"intro\n{benchtable.START}\n| gate |")
    assert text.endswith(f"{benchtable.END}\noutro\n") and "old figures" not in text
    assert main(["bench-table", str(bench_json), "--update", str(doc)]) == 0
    assert doc.read_text() == text  # idempotent


def test_bad_inputs_say_what_is_wrong(tmp_path, capsys):
    assert main(["bench-table", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(["bench-table", str(tmp_path / "bad.json")]) == 2
    (tmp_path / "none.json").write_text('{"benchmarks": []}')
    assert main(["bench-table", str(tmp_path / "none.json")]) == 1
    assert "no probe_gate results" in capsys.readouterr().err
    with pytest.raises(ValueError, match="update must name a file"):
        benchtable.update_file(tmp_path / "nomarkers.md", "x")


def test_the_footer_explains_interleaved_ratios_only_when_a_gate_used_them(bench_json, capsys):
    main(["bench-table", str(bench_json)])
    assert "interleave" not in capsys.readouterr().out
    data = json.loads(bench_json.read_text())
    data["benchmarks"][0]["extra_info"]["interleave"] = True
    bench_json.write_text(json.dumps(data))
    main(["bench-table", str(bench_json)])
    assert "alternate call by call (interleave), the mean over a round's positions" in \
        capsys.readouterr().out
