"""The ``probe`` command: ``probe demo`` (the main job) and the run tools."""

from __future__ import annotations

import argparse

from probe import benchtable, demo


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per tool."""
    ap = argparse.ArgumentParser(prog="probe", description="optprobe: optimizer telemetry")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train a small conv net on digits under the probe")
    demo.add_arguments(d)
    d.set_defaults(func=demo.run)
    b = sub.add_parser("bench-table", help="markdown table of the gates in a bench.json")
    benchtable.add_arguments(b)
    b.set_defaults(func=benchtable.run)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``probe`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)
