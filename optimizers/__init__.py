"""Instrumented optimizers and their pure math cores. Imports hooks only."""

from optimizers.block_schedule import BlockSchedule  # noqa: F401
from optimizers.falcon_optimizer import Falcon  # noqa: F401
from optimizers.kfac import KFAC  # noqa: F401
from optimizers.muon import Muon  # noqa: F401

__all__ = ["KFAC", "BlockSchedule", "Falcon", "Muon"]
