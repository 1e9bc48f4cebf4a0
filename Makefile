# One-command set-up and runs. Every target creates .venv (Python 3.11+) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: train test test-all lint bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e '.[test]'
	touch $@

## train: the main job, hsae train on the embedded synthetic default (writes runs/default)
train: $(VENV)/.base
	$(VENV)/bin/hsae train --out runs/default

## test: the test suite CI runs (kernels through Triton's interpreter; no GPU needed)
test: $(VENV)/.test
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

## test-all: also the slow tests
test-all: $(VENV)/.test
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

lint: $(VENV)/.test
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check hsae_jax tests benchmarks

bench: $(VENV)/.base
	$(VENV)/bin/hsae bench

clean:
	rm -rf $(VENV) runs *.egg-info
