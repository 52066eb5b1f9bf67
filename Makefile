# make reproduce   build .venv from nothing, run every paper, write the report
# make test        build .venv if needed, run the test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all

.PHONY: setup reproduce test lint format smoke clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch
	$(BIN)/python -m pip install --quiet -r requirements.txt -c constraints.txt
	# torch-fidelity: the reference network of tests/test_inception.py only, unpacked beside
	# the venv, never into it (torchmetrics would import it, and it imports torchvision).
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/reference/torch-fidelity torch-fidelity==0.4.0
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

reproduce: setup
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --cores $(CORES) --report results/report.html

smoke: setup
	$(BIN)/snakemake --cores $(CORES) --configfile configs/smoke.yaml

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint

format: setup
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/snakefmt Snakefile rules

clean:
	rm -rf .snakemake data models checkpoints logs benchmarks/rules results mlflow.db mlflow.db.lock mlartifacts
