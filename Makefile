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
# where sweep cells run: inline (this process), local (submitit subprocesses) or slurm (one job array)
EXECUTOR ?= inline
TB_PORT ?= 6006

.PHONY: setup test test-faults demo demo-data sweep report bench gpu-check tensorboard lab clean

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
	$(PY) -m clipstudy sweep --profile $(PROFILE) --jobs $(JOBS) --executor $(EXECUTOR) $(SWEEP_ARGS)

report: setup
	$(PY) -m clipstudy report --profile $(PROFILE)

bench: setup
	$(PY) benchmarks/run_all.py

# One GPU, under 4 minutes: throughput, MFU, peak memory, loader vs GPU, retrieval eval, 2-GPU DDP.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py

# Every cell's event files (loss, lr, gradient norm, temperatures, per-epoch metrics), live.
tensorboard: setup
	$(VENV)/bin/tensorboard --logdir reports/runs --port $(TB_PORT)

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf reports/runs build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
