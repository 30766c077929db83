"""``probe tensorboard RUN_DIR``: start TensorBoard on a run folder (or a folder of runs) on
127.0.0.1 and print its URL. A single run folder is shown under its own name, not "."."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

DEFAULT_PORT = 6006


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    """True when nobody listens on ``host:port`` (a socket in TIME_WAIT does not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def is_run_folder(path: str) -> bool:
    """True when ``path`` itself holds TensorBoard event files (one run, not a folder of runs)."""
    try:
        return any(n.startswith("events.out.tfevents.") for n in os.listdir(path))
    except OSError:
        return False


def _named_logdir(logdir: str) -> tuple[str, str | None]:
    # TensorBoard names a run by its path below --logdir: "." for the logdir itself. A
    # temporary folder holding one link named after the run gives it its folder's name.
    if not is_run_folder(logdir):
        return logdir, None
    name = os.path.basename(os.path.abspath(logdir)) or "run"
    tmp = tempfile.mkdtemp(prefix="probe-tb-")
    os.symlink(os.path.abspath(logdir), os.path.join(tmp, name))
    return tmp, tmp


def start(logdir: str | os.PathLike, host: str = "127.0.0.1", port: int | None = 0,
          timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
    """Start TensorBoard (this interpreter's) on ``logdir``; returns (process, URL) once it
    answers HTTP. ``port=0`` picks a free port, ``None`` 6006 if free else a free one; a
    given port that is taken is a ValueError. Stop it with ``stop(process)``."""
    logdir = os.fspath(logdir)
    if not os.path.isdir(logdir):
        raise ValueError(f"RUN_DIR {logdir!r} is not a folder")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 0 <= port <= 65535):
        raise ValueError(f"port must be an int in [0, 65535] or None, got {port!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if port is None:
        port = DEFAULT_PORT if port_free(host, DEFAULT_PORT) else free_port(host)
    elif port == 0:
        port = free_port(host)
    elif not port_free(host, port):
        raise ValueError(f"port {port} on {host} is taken (another TensorBoard?); "
                         f"pass --port 0 for a free one")
    served, tmp = _named_logdir(logdir)
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", served, "--host", host,
           "--port", str(port), "--reload_interval", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc.probe_tmpdir = tmp  # removed by stop()
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            stop(proc)
            last = next((ln for ln in reversed(err.splitlines()) if ln.strip()), "")
            raise RuntimeError(f"tensorboard exited with code {proc.returncode}: {last[-300:]}")
        try:
            with urllib.request.urlopen(url + "data/environment", timeout=2):
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                proc.kill()
                stop(proc)
                raise RuntimeError(f"tensorboard did not answer on {url} within "
                                   f"{timeout:.0f} s") from None
            time.sleep(0.2)
    # its log goes nowhere once it serves; a full stderr pipe would block it
    if proc.stderr is not None:
        proc.stderr.close()
    return proc, url


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a server from ``start`` and remove its temporary folder."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    tmp = getattr(proc, "probe_tmpdir", None)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The ``probe tensorboard`` options."""
    ap.add_argument("logdir", metavar="RUN_DIR", help="a run folder or a folder of runs")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to serve on (127.0.0.1; 0.0.0.0 for every interface)")
    ap.add_argument("--port", type=int, default=None,
                    help="port (default 6006, or a free one when 6006 is taken; 0 = any free "
                         "port); a given port that is taken is an error")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    try:
        proc, url = start(args.logdir, args.host, args.port)
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"probe tensorboard: {exc}") from None
    # a SIGTERM must still stop the child server (the finally below), not orphan it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.port is None and not url.endswith(f":{DEFAULT_PORT}/"):
        print(f"port {DEFAULT_PORT} is taken: serving on a free port", flush=True)
    print(f"TensorBoard on {url}  (custom scalars: {url}#custom_scalars)  Ctrl-C to stop",
          flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop(proc)
