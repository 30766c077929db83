"""Collectors: TensorBoard, JSON lines, running summaries, profiler traces, console. Imports
hooks only."""

from dashboards.background import Background
from dashboards.console import Console
from dashboards.jsonlines import JSONLines, read_events
from dashboards.profiler import Profiler
from dashboards.summary import Summary
from dashboards.tensorboard import TensorBoard

__all__ = ["Background", "Console", "JSONLines", "Profiler", "Summary", "TensorBoard",
           "read_events"]
