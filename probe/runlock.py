"""A run's claim on its logdir: a lock file naming the process, so a second live run writing
into the same folder (its steps would interleave with ours in one series) is warned about."""

from __future__ import annotations

import json
import os
import sys

LOCK = ".optprobe-run.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """Writes ``<logdir>/.optprobe-run.json`` (pid, run id) and warns on stderr when a live
    process other than this one holds it; ``release()`` removes our claim."""

    def __init__(self, logdir: str, run_id: str) -> None:
        self.path = os.path.join(logdir, LOCK)
        self.run_id = run_id
        self.other: dict | None = None
        try:
            with open(self.path, encoding="utf-8") as f:
                held = json.load(f)
            pid = held.get("pid") if isinstance(held, dict) else None
            if isinstance(pid, int) and pid != os.getpid() and _alive(pid):
                self.other = held
        except (OSError, ValueError):
            pass
        if self.other is not None:
            print(f"optprobe: {logdir} is also being written by process {self.other['pid']} "
                  f"(run {self.other.get('run')}); its steps and this run's ("
                  f"{run_id}) will interleave in TensorBoard: give each run its own logdir",
                  file=sys.stderr)
        try:
            with open(self.path, "w", encoding="utf-8") as f:
                json.dump({"pid": os.getpid(), "run": run_id}, f)
        except OSError:
            pass  # a read-only folder is the collectors' problem to report

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        try:
            with open(self.path, encoding="utf-8") as f:
                held = json.load(f)
            if isinstance(held, dict) and held.get("run") == self.run_id:
                os.remove(self.path)
        except (OSError, ValueError):
            pass
