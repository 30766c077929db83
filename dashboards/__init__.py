"""Collectors: TensorBoard, JSON lines, running summaries. Imports hooks only."""

from dashboards.background import Background
from dashboards.jsonlines import JSONLines, read_events
from dashboards.summary import Summary
from dashboards.tensorboard import TensorBoard

__all__ = ["Background", "JSONLines", "Summary", "TensorBoard", "read_events"]
