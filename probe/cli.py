"""The ``probe`` command: ``probe demo`` (the main job) and the run tools."""

from __future__ import annotations

import argparse

from probe import benchtable, demo, report, tensorboard_cmd


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per tool."""
    ap = argparse.ArgumentParser(prog="probe", description="optprobe: optimizer telemetry")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train a small conv net on digits under the probe")
    demo.add_arguments(d)
    d.set_defaults(func=demo.run)
    r = sub.add_parser("report", help="tables and figures from runs' events.jsonl")
    report.add_arguments(r)
    r.set_defaults(func=report.run)
    t = sub.add_parser("tensorboard", help="serve a run folder with TensorBoard")
    tensorboard_cmd.add_arguments(t)
    t.set_defaults(func=tensorboard_cmd.run)
    b = sub.add_parser("bench-table", help="markdown table of the gates in a bench.json")
    benchtable.add_arguments(b)
    b.set_defaults(func=benchtable.run)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``probe`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)
