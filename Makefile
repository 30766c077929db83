# `make demo` and `make test` set up .venv on a fresh machine (idempotent) and run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.optprobe-installed
PYTEST_ARGS ?=

.PHONY: setup demo test bench lint clean

$(STAMP): pyproject.toml scripts/setup-venv.sh
	bash scripts/setup-venv.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m probe demo

test: $(STAMP)
	$(PY) -m pytest -q tests --ignore=tests/benchmarks $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pytest -q tests/benchmarks --benchmark-only --benchmark-json=bench.json $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs bench.json .pytest_cache .benchmarks
