#!/usr/bin/env bash
# Sets up the project's virtual environment in $1 (default .venv). Keeps a torch that the
# base interpreter already has (a user's CUDA build, seen through --system-site-packages);
# installs torch==2.13.0 only where none is importable.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  if "$python" -c "import torch" >/dev/null 2>&1; then
    echo "setup: keeping the installed torch $("$python" -c 'import torch; print(torch.__version__)')"
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# this machine's pip config names local indexes that may be absent: drop those warnings only
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0"
  quiet "${pip[@]}" install "torch==2.13.0"
fi
echo "setup: installing optprobe and its dependencies"
quiet "${pip[@]}" install -e ".[dev,compat]"
