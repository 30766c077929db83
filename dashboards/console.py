"""Console collector: at close, the time breakdown per stage and the slowest parameters."""

from __future__ import annotations

import sys
from typing import TextIO

from hooks import Event


class Console:
    """Sums ``time/<stage>`` spans and ``step/time_ms``; ``close()`` prints a table of time
    per stage, its share of the step time and the ``top`` slowest parameters."""

    name = "Console"

    def __init__(self, stream: TextIO | None = None, top: int = 5) -> None:
        if isinstance(top, bool) or not isinstance(top, int) or top < 0:
            raise ValueError(f"top must be an int >= 0, got {top!r}")
        self.stream = stream
        self.top = top
        self.stages: dict[str, list[float]] = {}  # stage -> [total ms, count]
        self.params: dict[str, float] = {}  # param -> total ms over its stages
        self.step_ms = 0.0
        self.step_steps: set[int] = set()
        self.stage_steps: set[int] = set()
        self._closed = False

    def handle(self, events: list[Event]) -> None:
        for e in events:
            if type(e.value) is not float:
                continue
            if e.topic == "step/time_ms" and not e.tags:
                self.step_ms += e.value
                self.step_steps.add(e.step)
            elif e.topic.startswith("time/"):
                s = self.stages.setdefault(e.topic[5:], [0.0, 0])
                s[0] += e.value
                s[1] += 1
                self.stage_steps.add(e.step)
                if e.param:
                    self.params[e.param] = self.params.get(e.param, 0.0) + e.value

    def render(self) -> str:
        """The breakdown as text (empty when no span was timed)."""
        if not self.stages:
            return ""
        # a stage's share is against the step time of the same steps only
        step_ms = self.step_ms if self.stage_steps <= self.step_steps else 0.0
        n = max(1, len(self.stage_steps))
        width = max(12, *(len(k) for k in self.stages))
        head = f"{'stage':<{width}} {'total ms':>10} {'ms/step':>9} {'calls':>6} {'% step':>7}"
        lines = ["time per stage", head, "-" * len(head)]
        for stage, (total, count) in sorted(self.stages.items(), key=lambda kv: -kv[1][0]):
            share = f"{100 * total / step_ms:>6.1f}%" if step_ms > 0 else f"{'-':>7}"
            lines.append(f"{stage:<{width}} {total:>10.3f} {total / n:>9.3f} {count:>6d} "
                         f"{share}")
        if step_ms > 0:
            lines.append(f"{'step (whole)':<{width}} {step_ms:>10.3f} {step_ms / n:>9.3f} "
                         f"{len(self.step_steps):>6d} {100.0:>6.1f}%")
        if self.params and self.top:
            lines += ["", "slowest parameters (sum of their stage times)"]
            slow = sorted(self.params.items(), key=lambda kv: -kv[1])[:self.top]
            pw = max(9, *(len(k) for k, _ in slow))
            for name, total in slow:
                lines.append(f"{name:<{pw}} {total:>10.3f} ms")
        return "\n".join(lines)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        text = self.render()
        if text:
            print(text, file=self.stream if self.stream is not None else sys.stdout)
