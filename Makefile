# One command to set up and run the demo, one to set up and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/gossiptrain demo

lint: setup
	$(VENV)/bin/ruff check gossiptrain tests benchmarks examples
	$(VENV)/bin/ruff format --check gossiptrain tests benchmarks examples

test: setup lint
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/round_time.py
