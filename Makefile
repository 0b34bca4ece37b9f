# DeepSports: `make install`, `make test` (lint, then pytest), `make demo`, `make bench`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
TORCHSORT_PIN := torchsort==0.1.10
PYTEST_ARGS ?=
# Two pytest-xdist workers: much of the suite waits on SLURM, servers and single training processes. Tests that
# share a cluster run in one worker, a module's tests together (tests/conftest.py). PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
PYTEST_XDIST := $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder)
# The tracking store is mlflow.db in the working tree unless the user says otherwise.
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: install lint test demo bench ui clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel ninja
	$(BIN)/python -m pip install $(TORCH_PIN)
	# torchsort ships no wheel and its isolated build cannot see torch: build it against ours.
	bash scripts/install-torchsort.sh $(BIN)/python 0.1.10
	$(BIN)/python -m pip install -e '.[spearman,test,dashboard,bench]'
	touch $@

install: $(BIN)/.installed

# ruff's rules live in pyproject.toml ([tool.ruff]): pyflakes, pycodestyle, import order, bugbear, pyupgrade.
lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

demo: install
	@$(BIN)/deepsports demo

bench: install
	$(BIN)/python benchmarks/run_all.py

ui: install
	$(BIN)/deepsports ui --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
