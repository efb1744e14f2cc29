# clipstudy: every target a user runs installs what it needs from this repo.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.clipstudy-installed
LOCK := requirements/lock.txt
PROFILE ?= demo
JOBS ?= 1
# the demo runs one cell per core (one torch thread each): faster than threads on small models
DEMO_JOBS ?= $(shell nproc 2>/dev/null || echo 1)
DEMO_DATA ?= data/demo
SWEEP_ARGS ?=
STUDY_ARGS ?=
LOCK_ARGS ?=
# where sweep cells run: inline (this process), local (submitit subprocesses) or slurm (one job array)
EXECUTOR ?= inline
TB_PORT ?= 6006

.PHONY: setup lock lint format test test-faults test-mutation-resume mutation coverage demo demo-data study demo-long sweep report bench gpu-check tensorboard lab clean clean-runs

setup: $(STAMP)

# The environment is pinned by $(LOCK) (every package, exact version, PyPI's sha256 hashes), made
# by `make lock` from pyproject.toml. The stamp depends on both files, so a second `make setup` is
# a no-op and a changed lock reinstalls. The locked pip replaces the venv's own first.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else \
	  "$(LOCK) is for Python 3.11; this venv has " + sys.version.split()[0] + \
	  ": rm -rf $(VENV) and run make setup PYTHON=python3.11")'
	$(PY) -m pip install --quiet --require-hashes --no-deps -r <(sed -n '/^pip==/,/# via/p' $(LOCK))
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

# Re-resolves pyproject.toml (+ dev extra, build requirements) against PyPI alone (the machine's
# own pip configuration is set aside so the hashes are PyPI's) for this Python on Linux x86_64.
# Keeps every pin that still fits; LOCK_ARGS=--upgrade moves all to their newest releases.
lock: setup
	env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null \
	  CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile --quiet \
	  --generate-hashes --allow-unsafe --all-build-deps --extra dev --strip-extras \
	  --no-emit-index-url --no-emit-find-links --constraint requirements/constraints.txt \
	  --output-file $(LOCK) $(LOCK_ARGS) pyproject.toml

# Style and architecture: ruff (lint, and formatting unchanged) and the import-linter layer contracts
# of pyproject.toml (docs/architecture.md). Part of `make test`.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q

test-faults: setup
	$(PY) -m pytest -q -m faults

# The sweep on a real single-node Slurm (scripts/slurm-local.sh; as root it installs Debian's slurm-wlm, munge,
# slurmdbd and mariadb-server when missing), without and with accounting: the job array, --status, reruns,
# scontrol requeue, USR2, a time limit (tests/test_slurm.py, docs/slurm.md; 5 to 7 minutes on 2 cores).
.PHONY: test-slurm
test-slurm: setup
	$(PY) -m pytest -q -m slurm

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

# The demo in minutes on 2 cores: the data, then the 15 cells of the tuned protocol for one seed at the
# committed tuned rates (reports/demo/tuning.csv, made by `make study`), each through the training notebook
# (kept executed in its run folder); report in reports/demo-quick/.
demo: demo-data
	$(PY) -m clipstudy study --profile demo --data $(DEMO_DATA) --seeds 0 --protocols tuned \
	  --tuning-from reports/demo/tuning.csv --out reports/demo-quick --jobs $(DEMO_JOBS) --notebooks $(STUDY_ARGS)

# The fair demo study (under an hour on 2 cores): every optimizer tuned on the validation sets with the same
# budget, the shared and the tuned protocol on 5 fresh seeds, the report in reports/demo/ (committed). Its 195
# runs train in worker processes, without a notebook each (STUDY_ARGS=--notebooks keeps them).
study: demo-data
	$(PY) -m clipstudy study --profile demo --data $(DEMO_DATA) --jobs $(DEMO_JOBS) $(STUDY_ARGS)

# The long-run check (docs/results.md, "The long run"): the three optimizers with CLIP and SogCLR on 3 seeds at
# the shared rate, 4x the demo's steps (12 epochs), so that steps x learning rate matches the paper's run
# (23,430 x 2e-4 = 4.7; demo 1,500 x 3.16e-3 = 4.7); report with the weight-norm trajectories in reports/demo-long/.
demo-long: demo-data
	$(PY) -m clipstudy sweep --profile demo --data $(DEMO_DATA) --runs reports/runs/demo-long \
	  --optimizers adamw,sgd,adam --losses clip,sogclr --seeds 0,1,2 --lr-from reports/demo/tuning.csv \
	  --protocol shared --set epochs=12 --set eval_every=3 --jobs $(DEMO_JOBS) $(SWEEP_ARGS)
	$(PY) -m clipstudy report --profile demo --runs reports/runs/demo-long --out reports/demo-long

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

# JupyterLab on your working copies of the notebooks in LAB_DIR (made from notebooks/ when missing; the folder
# ignores itself, so editing them leaves the checkout clean and runs record a clean git_commit). LAB_ARGS go
# to jupyter lab, e.g. on a remote machine: make lab LAB_ARGS="--no-browser --ip 0.0.0.0 --port 8890".
# As root (containers, GPU boxes) --allow-root is added. docs/jupyterlab.md.
LAB_DIR ?= notebooks/work
LAB_ARGS ?=
lab: setup
	@mkdir -p $(LAB_DIR) && { [ -f $(LAB_DIR)/.gitignore ] || echo '*' > $(LAB_DIR)/.gitignore; }
	@for tracked in notebooks/*.ipynb; do copy=$(LAB_DIR)/$$(basename $$tracked); \
	  if [ ! -f $$copy ]; then cp $$tracked $$copy && echo "made $$copy from $$tracked"; \
	  elif [ $$tracked -nt $$copy ]; then echo "note: $$tracked changed after your $$copy was made (delete yours to get it)"; fi; \
	done
	@echo "JupyterLab on $(LAB_DIR)/: your working copies of the notebooks, outside git (docs/jupyterlab.md)"
	$(VENV)/bin/jupyter lab --notebook-dir=$(LAB_DIR) $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(LAB_ARGS)

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
