"""Instrumented optimizers and their pure math cores. Imports hooks only."""

from optimizers.kfac import KFAC  # noqa: F401
