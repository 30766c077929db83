"""Instrumented optimizers and their pure math cores. Imports hooks only."""

from optimizers.block_schedule import BlockSchedule  # noqa: F401
from optimizers.falcon_optimizer import Falcon  # noqa: F401
from optimizers.muon import Muon  # noqa: F401
