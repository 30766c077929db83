"""pytest plugin (entry point ``pytest11``): benchmark gates on top of pytest-benchmark.

``probe_gate(candidate, baseline, max_ratio=1.05)`` times both callables in the same test,
interleaved call by call (B A A B B A ...) after an interleaved warm-up, stores both medians and
the median of the rounds' candidate/baseline ratios in ``benchmark.extra_info`` (kept by
``--benchmark-json``/``--benchmark-autosave``) and fails when that ratio passes ``max_ratio``
times ``--probe-gate-slack``.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

_RESULTS = pytest.StashKey[list]()
_MAX_AUTO_ROUNDS = 1000


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("optprobe", "optprobe benchmark gates")
    group.addoption("--probe-gate-slack", type=float, default=1.0,
                    help="multiply every probe_gate bound by this factor (> 0; use > 1 on "
                         "noisy machines; default 1.0)")
    group.addoption("--probe-gate-report-only", action="store_true", default=False,
                    help="measure and report gate ratios without failing the test")
    group.addoption("--probe-gate-max-rounds", type=int, default=None, metavar="N",
                    help="cap every gate's rounds (explicit or auto) at N >= 3, to bound the "
                         "time of a whole bench run")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU")
    slack = config.getoption("--probe-gate-slack", 1.0)
    if slack is not None and not (math.isfinite(slack) and slack > 0):
        raise pytest.UsageError(f"--probe-gate-slack must be a finite number > 0, got {slack}")
    cap = config.getoption("--probe-gate-max-rounds", None)
    if cap is not None and cap < 3:
        raise pytest.UsageError(f"--probe-gate-max-rounds must be an int >= 3, got {cap}")
    config.stash[_RESULTS] = []


@dataclass(frozen=True)
class GateResult:
    """What one gate measured: per-call medians (seconds), their ratio and the bound used."""

    label: str
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


def _check_args(candidate: Any, baseline: Any, max_ratio: Any, warmup: Any, rounds: Any,
                inner: Any, interleave: Any = False) -> None:
    if not callable(candidate) or not callable(baseline):
        raise ValueError("candidate and baseline must be callables taking no argument")
    if (isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float))
            or not (math.isfinite(max_ratio) and max_ratio > 0)):
        raise ValueError(f"max_ratio must be a finite number > 0, got {max_ratio!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int)
                               or rounds < 3):
        raise ValueError(f"rounds must be None (auto) or an int >= 3, got {rounds!r}")
    if isinstance(inner, bool) or not isinstance(inner, int) or inner < 1:
        raise ValueError(f"inner must be an int >= 1, got {inner!r}")
    if not isinstance(interleave, bool):
        raise ValueError(f"interleave must be True or False, got {interleave!r}")


def _timed(fn: Callable[[], None], timer: Callable[[], float], disable_gc: bool) -> float:
    """Time one call the way pytest-benchmark times the candidate (same timer, same gc rule)."""
    if disable_gc:
        was_enabled = gc.isenabled()
        gc.disable()
    try:
        t0 = timer()
        fn()
        return timer() - t0
    finally:
        if disable_gc and was_enabled:
            gc.enable()


def _sums(times: list[float], n: int) -> list[float]:
    """The sums of consecutive groups of ``n`` of ``times`` (a trailing part dropped)."""
    if n == 1:
        return times
    return [math.fsum(times[i:i + n]) for i in range(0, len(times) - n + 1, n)]


def _position_ratio(cand: list[float], base: list[float], inner: int) -> float:
    """With ``interleave``: the mean over a round's ``inner`` positions of the median, over
    rounds, of that position's candidate / baseline pair. Each call is paired with the
    baseline call beside it, so a slow spell cancels as at ``inner=1``; each position keeps
    its own median, so a call that is slow on purpose (a round's one sampled step) counts at
    its weight instead of being voted out as an outlier or deciding a round."""
    rounds = min(len(cand), len(base)) // inner
    return math.fsum(statistics.median(
        cand[r * inner + k] / base[r * inner + k] if base[r * inner + k] > 0 else math.inf
        for r in range(rounds)) for k in range(inner)) / inner


def _auto_rounds(config: pytest.Config, pair_seconds: float) -> int:
    """Rounds that fit pytest-benchmark's ``--benchmark-max-time`` (at least its min rounds)."""
    max_time = float(config.getoption("benchmark_max_time", 1.0) or 1.0)
    min_rounds = max(3, int(config.getoption("benchmark_min_rounds", 5) or 5))
    fit = int(max_time / pair_seconds) if pair_seconds > 0 else _MAX_AUTO_ROUNDS
    return max(min_rounds, min(fit, _MAX_AUTO_ROUNDS))


@pytest.fixture
def probe_gate(benchmark, request) -> Callable[..., GateResult]:
    """``probe_gate(candidate, baseline, max_ratio=1.05, *, warmup=3, rounds=None, inner=1,
    interleave=False, label=None)``: benchmark ``candidate`` against ``baseline`` interleaved;
    fail past the bound.
    """
    config = request.config
    slack = config.getoption("--probe-gate-slack")
    report_only = config.getoption("--probe-gate-report-only")
    cap = config.getoption("--probe-gate-max-rounds")
    used = []

    def gate(candidate: Callable[[], Any], baseline: Callable[[], Any],
             max_ratio: float = 1.05, *, warmup: int = 3, rounds: int | None = None,
             inner: int = 1, interleave: bool = False,
             label: str | None = None) -> GateResult:
        _check_args(candidate, baseline, max_ratio, warmup, rounds, inner, interleave)
        if used:
            raise RuntimeError("probe_gate can be called once per test (pytest-benchmark keeps "
                               "one result per test); parametrize the test for several gates")
        used.append(True)
        name = label or request.node.name
        if hasattr(config, "workerinput") or benchmark.disabled:
            # Still run both once, so a broken gate shows up in a plain (or -n) test run.
            candidate()
            baseline()
            why = ("pytest-benchmark is off under pytest-xdist; run benchmarks without -n"
                   if hasattr(config, "workerinput") else "benchmarks disabled")
            pytest.skip(f"probe_gate {name!r} not measured: {why} (candidate and baseline "
                        f"ran once, no timing gated)")
        timer = getattr(benchmark, "_timer", time.perf_counter)
        disable_gc = bool(getattr(benchmark, "_disable_gc", False))
        cand, base = _repeat(candidate, inner), _repeat(baseline, inner)
        pair = 0.0
        for _ in range(max(warmup, 1 if rounds is None else 0)):
            pair = _timed(base, timer, disable_gc) + _timed(cand, timer, disable_gc)
        n_rounds = rounds if rounds is not None else _auto_rounds(config, pair)
        if cap is not None:
            n_rounds = min(n_rounds, cap)
        # interleave: a round's inner calls alternate with the baseline's one by one, each
        # timed, so a slow spell shorter than the round (most, on a shared 2-core box) hits
        # both sides alike; a round's sums are its sample
        by_call = interleave and inner > 1
        timed_cand, timed_base = (candidate, baseline) if by_call else (cand, base)
        per_call = inner if by_call else 1
        base_times: list[float] = []
        # Baseline before the candidate in even calls, after it in odd ones (B A A B B A ...):
        # whichever runs second in a pair tends to run warmer, so no side keeps that edge.
        calls = [0, 0]

        def before() -> None:
            if calls[0] % 2 == 0:
                base_times.append(_timed(timed_base, timer, disable_gc))
            calls[0] += 1

        def after() -> None:
            if calls[1] % 2 == 1:
                base_times.append(_timed(timed_base, timer, disable_gc))
            calls[1] += 1

        benchmark.pedantic(timed_cand, setup=before, teardown=after,
                           rounds=n_rounds * per_call, warmup_rounds=0)
        by_call_ratio = _position_ratio(benchmark.stats.stats.data, base_times, per_call) \
            if by_call else None
        cand_times = _sums(list(benchmark.stats.stats.data), per_call)
        base_times = _sums(base_times, per_call)[:n_rounds]
        c_med = statistics.median(cand_times) / inner
        b_med = statistics.median(base_times) / inner
        # Each round's two calls run back to back, so a slow spell of the machine (neighbours'
        # load lasts many calls: lag-1 autocorrelation 0.85 on the 2-core CI box) slows both:
        # their ratio cancels it, where the ratio of medians keeps it (A/A spread 4x wider).
        ratio = by_call_ratio if by_call_ratio is not None else statistics.median(
            c / b if b > 0 else math.inf for c, b in zip(cand_times, base_times))
        bound = max_ratio * slack
        passed = ratio <= bound
        benchmark.extra_info.update({
            "probe_gate_label": name,
            "probe_gate_ratio": ratio, "probe_gate_bound": bound,
            "probe_gate_max_ratio": max_ratio, "probe_gate_slack": slack,
            "probe_gate_report_only": report_only,
            "candidate_median_s": c_med, "baseline_median_s": b_med,
            "probe_gate_ratio_of_medians": c_med / b_med if b_med > 0 else math.inf,
            "baseline_times_s": [t / inner for t in base_times],
            "rounds": n_rounds, "inner": inner, "interleave": by_call, "passed": passed,
        })
        result = GateResult(name, c_med, b_med, ratio, bound, n_rounds, inner, passed)
        config.stash[_RESULTS].append(result)
        if not passed and not report_only:
            pytest.fail(f"probe_gate {name!r}: median candidate/baseline ratio {ratio:.3f} "
                        f"> bound {bound:.3f} (max_ratio {max_ratio} x slack {slack}); "
                        f"candidate {c_med * 1e3:.4f} ms, baseline {b_med * 1e3:.4f} ms per "
                        f"call over {n_rounds} interleaved rounds", pytrace=False)
        return result

    return gate


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    """One line per measured gate, so report-only runs still show what passed its bound."""
    results = config.stash.get(_RESULTS, [])
    if not results:
        return
    report_only = config.getoption("--probe-gate-report-only")
    terminalreporter.section("probe gates")
    for r in results:
        status = "ok" if r.passed else ("OVER BOUND (report only)" if report_only else "FAILED")
        terminalreporter.write_line(
            f"{r.label}: ratio {r.ratio:.3f} (bound {r.bound:.3f}) candidate "
            f"{r.candidate_median * 1e3:.4f} ms, baseline {r.baseline_median * 1e3:.4f} ms, "
            f"{r.rounds} rounds -> {status}")
