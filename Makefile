# `make demo` and `make test` set up .venv on a fresh machine (idempotent) and run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.optprobe-installed
PYTEST_ARGS ?=
BENCH_JSON ?= bench.json
BENCH_DOC ?= docs/gates.md
# `make tensorboard` / `make report`: the runs to show and where report writes its figures
RUNS ?= runs
PLOTS ?= $(RUNS)/plots

.PHONY: setup demo test bench bench-table lint clean tensorboard report

$(STAMP): pyproject.toml scripts/setup-venv.sh
	bash scripts/setup-venv.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m probe demo

# The gates run too, with timing off: each runs its candidate and baseline once, then skips.
test: $(STAMP)
	$(PY) -m pytest -q tests --benchmark-disable $(PYTEST_ARGS)

# Writes $(BENCH_JSON) and prints the gate table even when a gate fails (the exit status stays).
bench: $(STAMP)
	$(PY) -m pytest -q tests/benchmarks --benchmark-only --benchmark-json=$(BENCH_JSON) \
	  $(PYTEST_ARGS); status=$$?; \
	  $(PY) -m probe bench-table $(BENCH_JSON) --command "$(strip make bench $(PYTEST_ARGS))"; exit $$status

# Rewrites the figures block of $(BENCH_DOC) from $(BENCH_JSON) (run `make bench` first).
bench-table: $(STAMP)
	$(PY) -m probe bench-table $(BENCH_JSON) --update $(BENCH_DOC) \
	  --command "$(strip make bench $(PYTEST_ARGS))"

# Serves $(RUNS) on 127.0.0.1 (port 6006, or a free one when it is taken) until Ctrl-C.
tensorboard: $(STAMP)
	$(PY) -m probe tensorboard $(RUNS)

# Tables, warnings and figures for every run under $(RUNS).
report: $(STAMP)
	$(PY) -m probe report $(RUNS) --plots $(PLOTS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs bench.json .pytest_cache .benchmarks
