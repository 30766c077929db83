"""Instrumented optimizers and their pure math cores. Imports hooks only."""

from optimizers.falcon_optimizer import Falcon  # noqa: F401
