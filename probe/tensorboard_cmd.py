"""``probe tensorboard RUN_DIR``: start TensorBoard on a run folder and print its URL."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(logdir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
          timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
    """Start TensorBoard (this interpreter's) on ``logdir``; returns (process, URL) once it
    answers HTTP. ``port=0`` picks a free port. The caller stops the process."""
    logdir = os.fspath(logdir)
    if not os.path.isdir(logdir):
        raise ValueError(f"RUN_DIR {logdir!r} is not a folder")
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", host,
           "--port", str(port), "--reload_interval", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise RuntimeError(f"tensorboard exited with code {proc.returncode}: {err}")
        try:
            with urllib.request.urlopen(url + "data/environment", timeout=2):
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"tensorboard did not answer on {url} within "
                                   f"{timeout:.0f} s") from None
            time.sleep(0.2)
    # its log goes nowhere once it serves; a full stderr pipe would block it
    if proc.stderr is not None:
        proc.stderr.close()
    return proc, url


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The ``probe tensorboard`` options."""
    ap.add_argument("logdir", metavar="RUN_DIR", help="a run folder or a folder of runs")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to serve on (127.0.0.1; 0.0.0.0 for every interface)")
    ap.add_argument("--port", type=int, default=6006, help="port (6006; 0 = any free port)")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    try:
        proc, url = start(args.logdir, args.host, args.port)
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"probe tensorboard: {exc}") from None
    # a SIGTERM must still stop the child server (the finally below), not orphan it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"TensorBoard on {url}  (custom scalars: {url}#custom_scalars)  Ctrl-C to stop",
          flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
