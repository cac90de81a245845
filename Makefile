# One command to set up and run the demo, one to set up and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint bench docs

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $@

demo: setup
	$(VENV)/bin/gossiptrain demo

lint: setup
	$(VENV)/bin/ruff check gossiptrain tests benchmarks examples
	$(VENV)/bin/ruff format --check gossiptrain tests benchmarks examples

test: setup lint
	$(PY) -m pytest -q

# The API reference from the docstrings (mkdocs.yml) into site/, warnings as errors: open site/index.html.
docs: $(VENV)/.docs-installed
	$(VENV)/bin/mkdocs build --strict

# The pure protocol, codec and strategy tests (no peers, no sockets): seconds, for iteration.
test-fast: setup lint
	$(PY) -m pytest -q -m "not slow"

# Every benchmark, one after the other; results (with each run's wall time) land in benchmarks/results/.
bench: setup
	$(PY) benchmarks/round_time.py
	$(PY) benchmarks/compression.py
	$(PY) benchmarks/churn_soak.py --task charlm
	$(PY) benchmarks/state_download.py --out benchmarks/results/state_download.json
	$(PY) benchmarks/startup.py
	$(PY) benchmarks/overlap.py
	$(PY) benchmarks/time_to_loss.py
