"""pytest plugin (entry point ``pytest11``): benchmark gates on top of pytest-benchmark.

``probe_gate(candidate, baseline, max_ratio=1.05)`` times both callables in the same test,
interleaved round by round after a warm-up, stores both medians and their ratio in
``benchmark.extra_info`` (kept by ``--benchmark-json``/``--benchmark-autosave``) and fails
when the ratio of medians passes ``max_ratio`` times ``--probe-gate-slack``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("optprobe", "optprobe benchmark gates")
    group.addoption("--probe-gate-slack", type=float, default=1.0,
                    help="multiply every probe_gate bound by this factor (>= 1 on noisy "
                         "machines; default 1.0)")
    group.addoption("--probe-gate-report-only", action="store_true", default=False,
                    help="report gate ratios without failing the test")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU")
    slack = config.getoption("--probe-gate-slack", 1.0)
    if slack is not None and not slack > 0:
        raise pytest.UsageError(f"--probe-gate-slack must be > 0, got {slack}")


@dataclass(frozen=True)
class GateResult:
    """What one gate measured: per-call medians (seconds), their ratio and the bound used."""

    candidate_median: float
    baseline_median: float
    ratio: float
    bound: float
    rounds: int
    inner: int
    passed: bool


def _repeat(fn: Callable[[], Any], inner: int) -> Callable[[], None]:
    if inner == 1:
        return fn

    def run() -> None:
        for _ in range(inner):
            fn()

    return run


def _check_args(max_ratio: float, warmup: int, rounds: int, inner: int) -> None:
    if not (isinstance(max_ratio, (int, float)) and max_ratio > 0):
        raise ValueError(f"max_ratio must be a number > 0, got {max_ratio!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(rounds, int) or rounds < 3:
        raise ValueError(f"rounds must be an int >= 3, got {rounds!r}")
    if not isinstance(inner, int) or inner < 1:
        raise ValueError(f"inner must be an int >= 1, got {inner!r}")


@pytest.fixture
def probe_gate(benchmark, request) -> Callable[..., GateResult]:
    """``probe_gate(candidate, baseline, max_ratio=1.05, *, warmup=3, rounds=25, inner=1)``:
    benchmark ``candidate`` against ``baseline`` interleaved; fail past ``max_ratio``."""
    config = request.config
    slack = config.getoption("--probe-gate-slack")
    report_only = config.getoption("--probe-gate-report-only")

    def gate(candidate: Callable[[], Any], baseline: Callable[[], Any],
             max_ratio: float = 1.05, *, warmup: int = 3, rounds: int = 25,
             inner: int = 1) -> GateResult:
        _check_args(max_ratio, warmup, rounds, inner)
        if not callable(candidate) or not callable(baseline):
            raise ValueError("candidate and baseline must be callables taking no argument")
        if hasattr(config, "workerinput"):
            pytest.skip("probe_gate: pytest-benchmark is off under pytest-xdist, so this gate "
                        "did not run; run benchmarks without -n")
        if benchmark.disabled:
            candidate()
            baseline()
            pytest.skip("probe_gate: benchmarks disabled (--benchmark-disable); candidate and "
                        "baseline ran once, no timing gated")
        cand, base = _repeat(candidate, inner), _repeat(baseline, inner)
        base_times: list[float] = []

        def time_baseline() -> None:  # pedantic's setup: runs before every candidate round
            t0 = time.perf_counter()
            base()
            base_times.append(time.perf_counter() - t0)

        benchmark.pedantic(cand, setup=time_baseline, rounds=rounds, warmup_rounds=warmup)
        cand_times = list(benchmark.stats.stats.data)
        base_times = base_times[warmup:warmup + rounds]
        c_med = statistics.median(cand_times) / inner
        b_med = statistics.median(base_times) / inner
        ratio = c_med / b_med if b_med > 0 else float("inf")
        bound = max_ratio * slack
        passed = ratio <= bound
        benchmark.extra_info.update({
            "probe_gate_ratio": ratio, "probe_gate_bound": bound,
            "probe_gate_max_ratio": max_ratio, "probe_gate_slack": slack,
            "candidate_median_s": c_med, "baseline_median_s": b_med,
            "baseline_times_s": [t / inner for t in base_times],
            "rounds": rounds, "inner": inner, "passed": passed,
        })
        result = GateResult(c_med, b_med, ratio, bound, rounds, inner, passed)
        if not passed and not report_only:
            pytest.fail(f"probe_gate: candidate/baseline ratio of medians {ratio:.3f} > bound "
                        f"{bound:.3f} (max_ratio {max_ratio} x slack {slack}); candidate "
                        f"{c_med * 1e3:.4f} ms, baseline {b_med * 1e3:.4f} ms per call over "
                        f"{rounds} interleaved rounds", pytrace=False)
        return result

    return gate
