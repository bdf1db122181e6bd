# One-command set-up: each target creates .venv and installs what it needs by itself.
# torch 2.13.0 is installed first (a CPU wheel on the CI machines); every later install is
# constrained to it, so no extra can pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: install system-deps demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt setup.py actmon/_fused.c actmon/_fused_scan.h
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,lightning]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/actmon demo

lint: $(STAMP)
	$(BIN)/ruff check actmon tests benchmarks
	$(BIN)/mypy actmon

system-deps:
	bash scripts/install-system-deps.sh

test: lint system-deps
	$(BIN)/python -m pytest -q

# Peers (wandb, fastai) come from the 'bench' extra; fastai with --no-deps (see pyproject.toml).
# The report is printed; `$(BIN)/python benchmarks/overhead.py --markdown benchmarks/RESULTS.md`
# also rewrites the committed table.
bench: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[bench]'
	$(BIN)/pip install --quiet -c constraints.txt --no-deps 'fastai>=2.7'
	$(BIN)/python benchmarks/kernels.py
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
