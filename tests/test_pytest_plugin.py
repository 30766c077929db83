"""The probe_gate plugin, driven through pytester in fresh pytest runs.

Timed callables sleep rather than compute: a 3x sleep stays about 3x on a loaded 2-core
machine (scheduler overshoot adds the same to both sides), where a busy loop would not.
"""

import json
import statistics
from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ("-p", "pytest_benchmark.plugin", "-p", "probe.pytest_plugin")

GATES = '''
import pathlib
import time
import pytest

D = 0.02  # 20 ms: a loaded machine's wake-up overshoot (10 ms under xdist) stays small beside it


def slow():
    time.sleep(3 * D)


def fast():
    time.sleep(D)


def test_slower(probe_gate):
    r = probe_gate(slow, fast, max_ratio=1.5, warmup=1, rounds=15)
    pathlib.Path("ratio.txt").write_text(repr(r.ratio))


def test_equal(probe_gate):
    r = probe_gate(fast, fast, max_ratio=1.5, warmup=1, rounds=15)
    pathlib.Path("ratio.txt").write_text(repr(r.ratio))
'''


@pytest.fixture
def run(pytester, monkeypatch):
    """Run pytest in a fresh process-local session with only the plugins under test."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OPTPROBE_STRICT_TOPICS", "1")
    # Under an outer ``-n`` run the worker's variable would make pytest-benchmark disable itself.
    for var in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(var, raising=False)
    pytester.makepyfile(test_gates=GATES)

    def go(*args, subprocess=False):
        if subprocess:  # for inner tests importing torch modules: pytester would unload them
            return pytester.runpytest_subprocess(*PLUGINS, "-p", "no:cacheprovider", *args)
        # The outer session imported the plugin already, so the inner one cannot rewrite it.
        return pytester.runpytest_inprocess(*PLUGINS, "-p", "no:cacheprovider", "-W",
                                            "ignore::pytest.PytestAssertRewriteWarning", *args)

    return go


def _bench_json(path):
    return {b["name"]: b for b in json.loads(Path(path).read_text())["benchmarks"]}


def test_three_times_slower_fails_a_1_5x_gate(run, pytester):
    res = run("-k", "slower", "--benchmark-json=out.json")
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines(["*probe_gate 'test_slower': median candidate/baseline ratio "
                              "* > bound 1.500 (max_ratio 1.5 x slack 1.0)*"])
    extra = _bench_json(pytester.path / "out.json")["test_slower"]["extra_info"]
    assert extra["passed"] is False and 1.5 < extra["probe_gate_ratio"] < 4.0


def test_equal_callables_pass(run):
    res = run("-k", "equal")
    res.assert_outcomes(passed=1)
    res.stdout.fnmatch_lines(["*probe gates*", "test_equal: ratio * (bound 1.500)*-> ok"])


def test_ratio_lands_in_benchmark_json(run, pytester):
    res = run("-k", "slower", "--benchmark-json=out.json", "--benchmark-save-data",
              "--probe-gate-report-only")
    res.assert_outcomes(passed=1)
    info = _bench_json(pytester.path / "out.json")["test_slower"]
    extra = info["extra_info"]
    assert extra["probe_gate_ratio"] == float((pytester.path / "ratio.txt").read_text())
    # Recompute from the raw timings pytest-benchmark kept, independently of the plugin.
    cand = info["stats"]["data"]
    assert len(cand) == 15 and len(extra["baseline_times_s"]) == 15
    base = extra["baseline_times_s"]  # round i's baseline ran next to candidate call i
    ratio = statistics.median(c / b for c, b in zip(cand, base))
    assert extra["probe_gate_ratio"] == pytest.approx(ratio, rel=1e-12)
    assert extra["probe_gate_ratio_of_medians"] == pytest.approx(
        statistics.median(cand) / statistics.median(base), rel=1e-12)
    assert 1.5 < extra["probe_gate_ratio"] < 4.0
    assert extra["probe_gate_bound"] == 1.5 and extra["passed"] is False
    assert extra["candidate_median_s"] == pytest.approx(info["stats"]["median"], rel=1e-12)
    assert 0.012 <= extra["candidate_median_s"] < 0.2


def test_slack_scales_the_bound_both_ways(run, pytester):
    loose = run("-k", "slower", "--probe-gate-slack=4", "--benchmark-json=loose.json")
    loose.assert_outcomes(passed=1)
    assert _bench_json(pytester.path / "loose.json")["test_slower"]["extra_info"][
        "probe_gate_bound"] == pytest.approx(6.0)
    tight = run("-k", "equal", "--probe-gate-slack=0.5")
    tight.assert_outcomes(failed=1)
    tight.stdout.fnmatch_lines(["*> bound 0.750 (max_ratio 1.5 x slack 0.5)*"])


def test_bad_slack_is_a_usage_error(run):
    res = run("--probe-gate-slack=0")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*--probe-gate-slack must be a finite number > 0, got 0.0*"])


def test_report_only_reports_without_failing(run):
    res = run("-k", "slower", "--probe-gate-report-only")
    res.assert_outcomes(passed=1)
    res.stdout.fnmatch_lines(["test_slower: ratio * (bound 1.500)*-> OVER BOUND (report only)"])


COUNTING = '''
import pathlib


def bump(name):
    p = pathlib.Path(name)
    p.write_text((p.read_text() if p.exists() else "") + "x")


def test_gate(probe_gate):
    probe_gate(lambda: bump("cand"), lambda: bump("base"), max_ratio=1.5)
'''


def test_xdist_reports_skipped_and_runs_each_callable_once(run, pytester):
    pytester.makepyfile(test_counting=COUNTING)
    res = run("-p", "xdist.plugin", "-n", "1", "-rs", "test_counting.py")
    res.assert_outcomes(skipped=1)
    res.stdout.fnmatch_lines(["*SKIPPED*probe_gate 'test_gate' not measured: "
                              "pytest-benchmark is off under pytest-xdist*"])
    assert (pytester.path / "cand").read_text() == "x"
    assert (pytester.path / "base").read_text() == "x"


def test_benchmark_disable_smoke_runs_once_then_skips(run, pytester):
    pytester.makepyfile(test_counting=COUNTING)
    res = run("--benchmark-disable", "-rs", "test_counting.py")
    res.assert_outcomes(skipped=1)
    res.stdout.fnmatch_lines(["*not measured: benchmarks disabled*"])
    assert (pytester.path / "cand").read_text() == "x"
    assert (pytester.path / "base").read_text() == "x"


ORDER = '''
import pathlib

import pytest

log = []


def test_order(probe_gate):
    r = probe_gate(lambda: log.append("A"), lambda: log.append("B"), max_ratio=1e9,
                   warmup=2, rounds=6)
    pathlib.Path("order.txt").write_text("".join(log))
    assert r.rounds == 6
    with pytest.raises(RuntimeError, match="once per test"):
        probe_gate(lambda: None, lambda: None)
'''


def test_rounds_interleave_abba_after_warmup(run, pytester):
    pytester.makepyfile(test_order=ORDER)
    run("test_order.py").assert_outcomes(passed=1)
    # warm-up pairs B A, then baseline before the candidate in even rounds and after in odd.
    assert (pytester.path / "order.txt").read_text() == "BABA" + "BAAB" * 3


def test_max_rounds_caps_explicit_rounds(run, pytester):
    pytester.makepyfile(test_order=ORDER.replace("r.rounds == 6", "r.rounds == 4"))
    run("test_order.py", "--probe-gate-max-rounds=4").assert_outcomes(passed=1)
    assert (pytester.path / "order.txt").read_text() == "BABA" + "BAAB" * 2
    res = run("test_order.py", "--probe-gate-max-rounds=2")
    assert res.ret == pytest.ExitCode.USAGE_ERROR


INTERLEAVED = '''
import json
import pathlib
import time

log = []
D = 0.01


def cand():
    # one call in three is slow: only the rounds' sums, never a single call, show the cost
    log.append("A")
    time.sleep(6 * D if log.count("A") % 3 == 0 else D)


def base():
    log.append("B")
    time.sleep(2 * D)


def test_interleaved(probe_gate):
    r = probe_gate(cand, base, max_ratio=1e9, warmup=1, rounds=4, inner=3, interleave=True)
    pathlib.Path("order.txt").write_text("".join(log))
    pathlib.Path("result.json").write_text(json.dumps(
        {"ratio": r.ratio, "rounds": r.rounds, "cand": r.candidate_median,
         "base": r.baseline_median}))
'''


def test_interleave_alternates_the_inner_calls_and_gates_on_the_rounds_sums(run, pytester):
    pytester.makepyfile(test_interleaved=INTERLEAVED)
    run("test_interleaved.py").assert_outcomes(passed=1)
    # the warm-up runs whole rounds (B B B A A A); then each call pairs B A, A B, B A, ...
    assert (pytester.path / "order.txt").read_text() == "BBBAAA" + "BAAB" * 6
    r = json.loads((pytester.path / "result.json").read_text())
    assert r["rounds"] == 4
    # a round: candidate 6D + D + D = 8D against 3 x 2D = 6D (the median single call, D
    # against 2D, would read 0.5)
    assert 1.2 < r["ratio"] < 1.45
    assert 0.75 * 8 / 3 * 0.01 < r["cand"] < 1.3 * 8 / 3 * 0.01
    assert 0.75 * 0.02 < r["base"] < 1.3 * 0.02


def test_position_ratio_weighs_each_position_and_ignores_a_spell():
    """Rounds of 3: the candidate's first call costs 3, the others 1, the baseline 1; a slow
    spell (x5 on both sides of a call) and one stray slow candidate call move nothing."""
    from probe.pytest_plugin import _position_ratio

    cand, base = [3.0, 1.0, 1.0] * 9, [1.0] * 27
    cand[4], base[4] = 5.0, 5.0  # a spell over one pair
    cand[8] = 10.0  # a stray
    assert _position_ratio(cand, base, 3) == pytest.approx(5 / 3)
    assert _position_ratio(cand[:-1], base, 3) == pytest.approx(5 / 3)  # whole rounds only

AUTO = '''
import pathlib
import time


def test_auto(probe_gate):
    r = probe_gate(lambda: time.sleep(0.01), lambda: time.sleep(0.01), max_ratio=1e9)
    pathlib.Path("rounds.txt").write_text(str(r.rounds))
'''


def test_auto_rounds_follow_benchmark_max_time(run, pytester):
    pytester.makepyfile(test_auto=AUTO)
    run("test_auto.py", "--benchmark-max-time=0.001",
        "--benchmark-min-rounds=4").assert_outcomes(passed=1)
    assert (pytester.path / "rounds.txt").read_text() == "4"
    run("test_auto.py", "--benchmark-max-time=0.3",
        "--benchmark-min-rounds=3").assert_outcomes(passed=1)
    # a pair takes >= 20 ms, so at most 15 rounds fit in 0.3 s
    assert 3 <= int((pytester.path / "rounds.txt").read_text()) <= 15


BAD = '''
import pytest

pytestmark = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")


@pytest.mark.parametrize("kw,name", [
    ({"max_ratio": 0}, "max_ratio"), ({"max_ratio": float("nan")}, "max_ratio"),
    ({"warmup": -1}, "warmup"), ({"rounds": 2}, "rounds"), ({"inner": 0}, "inner"),
    ({"interleave": 1}, "interleave"),
])
def test_bad(probe_gate, kw, name):
    calls = []
    with pytest.raises(ValueError, match=name):
        probe_gate(lambda: calls.append(1), lambda: calls.append(1), **kw)
    assert calls == []


def test_not_callable(probe_gate):
    with pytest.raises(ValueError, match="candidate and baseline"):
        probe_gate(1, lambda: None)
'''


def test_bad_arguments_raise_before_any_work(run, pytester):
    pytester.makepyfile(test_bad=BAD)
    run("test_bad.py").assert_outcomes(passed=7)


@pytest.mark.parametrize("doc", ["docs/gates.md", "README.md"])
def test_the_documented_example_gate_runs(run, pytester, doc):
    text = (ROOT / doc).read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    example, = [b for b in blocks if "def test_probe_costs_under_5_percent" in b]
    pytester.makepyfile(test_example=example)
    res = run("test_example.py", "--benchmark-max-time=0.05", "--probe-gate-report-only",
              subprocess=True)
    res.assert_outcomes(passed=1)
    res.stdout.fnmatch_lines(["test_probe_costs_under_5_percent: ratio * (bound 1.050)*"])
