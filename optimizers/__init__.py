"""Instrumented optimizers and their pure math cores. Imports hooks only."""

from optimizers.muon import Muon  # noqa: F401
