"""The ``probe`` command as a newcomer meets it: the commands the demo prints run as printed
in a fresh shell (no activated venv), Ctrl-C gives a partial summary, errors are one line
with the right usage, and ``probe tensorboard`` handles a busy port and names a lone run."""

import json
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from probe import tensorboard_cmd
from probe.cli import main, version

ROOT = pathlib.Path(__file__).resolve().parents[1]
FRESH = ["env", "-i", "PATH=/usr/bin:/bin", "bash", "-c"]


def _fresh(cmd, **kw):
    """Run ``cmd`` as a user pastes it: a fresh shell in the repository root, no venv."""
    return subprocess.run([*FRESH, cmd], cwd=ROOT, capture_output=True, text=True, **kw)


def _demo_cmd(runs, *extra):
    py = shlex.quote(sys.executable)
    return f"{py} -m probe demo --optimizer adamw --batch 32 --every 5 --runs " \
           f"{shlex.quote(str(runs))} --name t --no-progress " + " ".join(extra)


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    res = _fresh(_demo_cmd(runs, "--steps", "12"), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return runs, res.stdout


def _printed(out, verb):
    return [ln.strip() for ln in out.splitlines() if re.search(rf" -m probe {verb} ", ln)]


def test_printed_report_command_runs_in_a_fresh_shell(demo_output):
    runs, out = demo_output
    live = out.splitlines()[0]
    assert live.startswith("Watch it live: ") and " -m probe tensorboard " in live
    (report,) = _printed(out, "report")
    res = _fresh(report, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "== t-adamw" in res.stdout and "Figures written to" in res.stdout
    assert (runs / "t-plots" / "quality_vs_time.png").stat().st_size > 5000
    # what a bare name would do in that shell: not found
    assert _fresh("probe --version").returncode == 127


def _read_url(proc, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        m = re.search(r"TensorBoard on (http://\S+/)", line)
        if m:
            return m.group(1)
    raise AssertionError(f"no URL printed (rc {proc.poll()}): {proc.stderr.read()[-2000:]}")


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_printed_tensorboard_command_serves_in_a_fresh_shell(demo_output):
    runs, out = demo_output
    cmds = _printed(out, "tensorboard")
    live = "Watch it live: "
    assert len(cmds) == 2 and cmds[0] == live + cmds[1]  # the same command at start and end
    cmds = cmds[1:]
    assert cmds[0].endswith(shlex.quote(str(runs)))
    proc = subprocess.Popen([*FRESH, cmds[0]], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = _read_url(proc)
        assert url.startswith("http://127.0.0.1:")  # bound to loopback by default
        assert _get(url + "data/runs") == ["t-adamw"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM)


def test_tensorboard_names_a_lone_run_and_refuses_a_busy_port(demo_output):
    runs, _ = demo_output
    proc, url = tensorboard_cmd.start(runs / "t-adamw", port=0, timeout=90)
    try:
        assert _get(url + "data/runs") == ["t-adamw"]  # not "."
        busy = int(url.rsplit(":", 1)[1].strip("/"))
        assert not tensorboard_cmd.port_free("127.0.0.1", busy)
        with pytest.raises(SystemExit, match=f"port {busy} on 127.0.0.1 is taken"):
            main(["tensorboard", str(runs), "--port", str(busy)])
        # the default port, taken, gives way to a free one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            taken = s.getsockname()[1]
            old, tensorboard_cmd.DEFAULT_PORT = tensorboard_cmd.DEFAULT_PORT, taken
            try:
                p2, url2 = tensorboard_cmd.start(runs, port=None, timeout=90)
            finally:
                tensorboard_cmd.DEFAULT_PORT = old
            try:
                assert not url2.endswith(f":{taken}/")
                assert _get(url2 + "data/runs") == ["t-adamw"]
            finally:
                tensorboard_cmd.stop(p2)
    finally:
        tmp = proc.probe_tmpdir
        tensorboard_cmd.stop(proc)
    assert tmp and not os.path.exists(tmp)  # the link folder is gone; the run is not
    assert (runs / "t-adamw" / "events.jsonl").exists()


def test_ctrl_c_in_the_demo_prints_a_partial_summary(tmp_path):
    proc = subprocess.Popen([*FRESH, "exec " + _demo_cmd(tmp_path, "--steps", "100000")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    events = tmp_path / "t-adamw" / "events.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if events.exists() and events.read_text().count("train/loss") >= 20:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    row = next(ln for ln in out.splitlines() if ln.startswith("adamw"))
    steps = row.split()[1]
    assert steps.endswith("*") and int(steps[:-1]) >= 20
    assert "interrupted (Ctrl-C)" in out
    # the JSON lines hold every step the summary counts
    logged = sum(json.loads(x)["topic"] == "train/loss" for x in events.read_text().splitlines())
    assert logged == int(steps[:-1])


def test_version_and_sub_command_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"optprobe {version()}"
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--stpes", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: probe demo ") and "unrecognized arguments: --stpes 3" in err
    with pytest.raises(SystemExit) as exc:
        main(["report", "x", "--plotz", "y"])
    assert capsys.readouterr().err.startswith("usage: probe report ")


def test_make_targets_name_the_interpreter_commands():
    # `make -n` prints what the targets run, without setting up a venv
    # under `make test` this make is a sub-make: without the parent's flags and level it
    # prints no "Entering directory" lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    res = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.optprobe-installed",
                          "report", "tensorboard", "RUNS=some/runs"], cwd=ROOT,
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == [
        ".venv/bin/python -m probe report some/runs --plots some/runs/plots",
        ".venv/bin/python -m probe tensorboard some/runs"]
