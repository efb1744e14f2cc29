# clipstudy: every target a user runs installs what it needs from this repo.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.clipstudy-installed
PROFILE ?= demo
JOBS ?= 1
# the demo runs one cell per core (one torch thread each): faster than threads on small models
DEMO_JOBS ?= $(shell nproc 2>/dev/null || echo 1)
DEMO_DATA ?= data/demo
SWEEP_ARGS ?=

.PHONY: setup test test-faults test-mutation-resume mutation coverage demo demo-data sweep report bench lab clean

setup: $(STAMP)

# Re-installs only when the package metadata changes, so a second `make setup` is a no-op.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-faults: setup
	$(PY) -m pytest -q -m faults

# With the checkpoint loader made to find nothing, the kill -9, SIGTERM/SIGINT and full-disk resume tests must fail.
test-mutation-resume: setup
	$(PY) scripts/mutation_resume.py

# mutmut on the modules that carry the promises, killed / total per module (minutes per module on 2 cores).
mutation: setup
	$(PY) scripts/mutation_scores.py

coverage: setup
	$(PY) -m pytest -q -p no:cacheprovider --cov=clipstudy --cov-report=term

demo-data: setup
	$(PY) -m clipstudy make-demo-data --out $(DEMO_DATA)

# The whole study at small scale on the embedded benchmark: data, 15 cells, report.
demo: demo-data
	$(PY) -m clipstudy sweep --profile demo --data $(DEMO_DATA) --jobs $(DEMO_JOBS) $(SWEEP_ARGS)
	$(PY) -m clipstudy report --profile demo

sweep: setup
	$(PY) -m clipstudy sweep --profile $(PROFILE) --jobs $(JOBS) $(SWEEP_ARGS)

report: setup
	$(PY) -m clipstudy report --profile $(PROFILE)

bench: setup
	$(PY) benchmarks/run_all.py

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf reports/runs build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
