# bkn: every command a user needs. Each target sets up its own virtual environment first.
# Run `make help` for the list.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SCALE ?= smoke
LAUNCHER ?= local
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup test test-slow test-all demo

help:  ## list the targets
	@grep -hE '^[a-z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

# The stamp file re-runs the install whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed  ## create .venv and install bkn with its pinned dependencies

test: setup  ## the default test suite (under 10 minutes on 2 CPU cores)
	$(PY) -m pytest -q

test-slow: setup  ## only the tests marked slow
	$(PY) -m pytest -q -m slow

test-all: setup  ## every test
	$(PY) -m pytest -q -m 'slow or not slow'

BENCHMARK_PRESET ?= cpu
.PHONY: benchmark
benchmark: setup  ## training-step speed and memory of BN/BRN/BKN -> results/benchmark/ (BENCHMARK_PRESET=cpu|gpu, ARGS=...)
	$(PY) scripts/benchmark.py --preset $(BENCHMARK_PRESET) $(ARGS)
