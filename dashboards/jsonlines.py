"""JSON-lines collector: one event per line, each line written whole."""

from __future__ import annotations

import json
import os

from hooks import Event


class JSONLines:
    """Appends events to ``path`` as JSON objects, one per line, flushed after every batch.

    A batch is joined into one string and written with one call, then flushed, so a process
    killed mid-run leaves whole lines behind except possibly the last. NaN and Inf are
    written as the JSON extensions ``NaN``/``Infinity`` that Python's json reads back.
    """

    name = "JSONLines"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def handle(self, events: list[Event]) -> None:
        if self._file.closed:
            return
        text = "".join(json.dumps(e.to_dict(), separators=(",", ":")) + "\n" for e in events)
        self._file.write(text)
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_events(path: str | os.PathLike) -> tuple[list[dict], list[tuple[int, str]]]:
    """Parse an events.jsonl file: the good records and (line number, reason) of bad lines."""
    good: list[dict] = []
    bad: list[tuple[int, str]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append((n, f"not JSON: {exc.msg}"))
                continue
            if not isinstance(rec, dict) or not {"topic", "step", "value"} <= rec.keys():
                bad.append((n, "missing topic/step/value"))
                continue
            good.append(rec)
    return good, bad
