"""The ``probe`` command: ``probe demo`` (the main job) and the run tools."""

from __future__ import annotations

import argparse
from importlib import metadata

from probe import benchtable, demo, report, tensorboard_cmd


def version() -> str:
    """The installed optprobe version ('unknown' from a bare checkout)."""
    try:
        return metadata.version("optprobe")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The argument parser and its sub-parsers (one per tool), by command name."""
    ap = argparse.ArgumentParser(prog="probe", description="optprobe: optimizer telemetry")
    ap.add_argument("--version", action="version", version=f"optprobe {version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    tools = {
        "demo": ("train a small conv net on digits under the probe", demo),
        "report": ("tables, warnings and figures from runs' events.jsonl", report),
        "tensorboard": ("serve run folders with TensorBoard (127.0.0.1)", tensorboard_cmd),
        "bench-table": ("markdown table of the gates in a bench.json", benchtable),
    }
    parsers = {}
    for name, (helptext, mod) in tools.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
        parsers[name] = p
    return ap, parsers


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``probe`` console script."""
    ap, parsers = build_parser()
    args, extra = ap.parse_known_args(argv)
    if extra:
        # a typo'd option belongs to the sub-command: show its usage, not the top level's
        parsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)
