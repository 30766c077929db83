"""``probe bench-table``: turn a pytest-benchmark JSON of probe gates into a markdown table.

The README's figures are produced by this, not typed: ``--update FILE`` rewrites the block
between ``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->`` in FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def load_gates(path: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The gate entries (benchmarks with a ``probe_gate_ratio``) and the run's metadata."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"path must be a pytest-benchmark JSON file, {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text())
        benches = data["benchmarks"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"path must be a pytest-benchmark JSON file, {str(p)!r} is not: "
                         f"{e}") from e
    gates = [b for b in benches if "probe_gate_ratio" in b.get("extra_info", {})]
    return gates, {k: data.get(k) for k in ("machine_info", "commit_info", "datetime")}


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def render(gates: list[dict[str, Any]], meta: dict[str, Any], command: str) -> str:
    """Markdown: one row per gate (target, measured ratio, both medians, rounds, verdict)."""
    lines = ["| gate | target | measured | candidate ms | baseline ms | rounds | result |",
             "|---|---|---|---|---|---|---|"]
    for b in sorted(gates, key=lambda b: b["fullname"]):
        x = b["extra_info"]
        verdict = "pass" if x["passed"] else "**over bound**"
        # a gate may report its own figure (e.g. µs per span) instead of the raw ratio
        target = x.get("report_target") or f"≤ {x['probe_gate_max_ratio']:g}x"
        measured = x.get("report_value") or f"{x['probe_gate_ratio']:.3f}x"
        lines.append(
            f"| {x.get('probe_gate_label') or b['name']} "
            f"| {target} | {measured} "
            f"| {_ms(x['candidate_median_s'])} | {_ms(x['baseline_median_s'])} "
            f"| {x['rounds']} | {verdict} |")
    mi, ci = meta.get("machine_info") or {}, meta.get("commit_info") or {}
    cpu = (mi.get("cpu") or {}).get("brand_raw") or mi.get("processor") or "unknown cpu"
    cores = (mi.get("cpu") or {}).get("count", "?")
    slack = {b["extra_info"].get("probe_gate_slack", 1.0) for b in gates}
    lines += ["", f"Measured {meta.get('datetime') or '?'} on {cpu} ({cores} cores), Python "
              f"{mi.get('python_version', '?')}, commit {str(ci.get('id', '?'))[:10]}"
              f"{' (dirty)' if ci.get('dirty') else ''}, slack {', '.join(map(str, slack))}; "
              "ratio = median over rounds of candidate / baseline, the two run back to back in "
              "each round"
              f"{_interleaved_note(gates)}. "
              f"Command: `{command}`."]
    return "\n".join(lines) + "\n"


def _interleaved_note(gates: list[dict]) -> str:
    """The table footer's word on gates timed call by call (``interleave``), if any ran."""
    if not any(b["extra_info"].get("interleave") for b in gates):
        return ""
    return ("; for gates whose rounds alternate call by call (interleave), the mean "
            "over a round's positions of each position's median candidate / baseline pair")


def update_file(path: str | os.PathLike, table: str) -> None:
    """Replace the text between the bench-table markers in ``path`` with ``table``."""
    p = Path(path)
    text = p.read_text() if p.is_file() else ""
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ValueError(f"update must name a file holding {START} ... {END}, {str(p)!r} "
                         "does not")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    p.write_text(f"{head}{START}\n{table}{END}{tail}")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """Options of ``probe bench-table``."""
    ap.add_argument("json", help="pytest-benchmark JSON written by `make bench` (bench.json)")
    ap.add_argument("--update", metavar="FILE",
                    help="rewrite the bench-table block of this markdown file instead of printing")
    ap.add_argument("--command", default="make bench",
                    help="the command that produced the JSON, quoted under the table")


def run(args: argparse.Namespace) -> int:
    """Print (or write into ``--update``) the table; 1 when the JSON holds no gate."""
    try:
        gates, meta = load_gates(args.json)
        if not gates:
            print(f"probe bench-table: no probe_gate results in {args.json}", file=sys.stderr)
            return 1
        table = render(gates, meta, args.command)
        if args.update:
            update_file(args.update, table)
        else:
            sys.stdout.write(table)
    except ValueError as e:
        print(f"probe bench-table: {e}", file=sys.stderr)
        return 2
    return 0
