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

.PHONY: setup test test-faults demo demo-data sweep report bench lab clean clean-runs

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

# Build and cache files only: runs (possibly GPU-hours) are never removed here.
clean:
	rm -rf build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Deletes every run under reports/runs/ (all profiles): asks first, or CONFIRM=1 (`make clean-runs CONFIRM=1`).
RUNS_DIRS := reports/runs
clean-runs:
	@if [ ! -d $(RUNS_DIRS) ]; then echo "nothing to delete: no $(RUNS_DIRS)/"; exit 0; fi; \
	echo "This deletes $$(find $(RUNS_DIRS) -name metrics.json | wc -l) run(s) in $(RUNS_DIRS)/ ($$(du -sh $(RUNS_DIRS) | cut -f1)):"; \
	ls $(RUNS_DIRS); \
	if [ "$(CONFIRM)" != 1 ]; then \
		if [ -t 0 ]; then read -r -p "Delete them? Type yes: " answer; else answer=; fi; \
		if [ "$$answer" != yes ]; then echo "not deleted (run 'make clean-runs CONFIRM=1' to delete without asking)"; exit 1; fi; \
	fi; \
	rm -rf $(RUNS_DIRS) && echo "deleted $(RUNS_DIRS)/"
