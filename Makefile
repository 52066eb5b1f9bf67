# make reproduce   build .venv from nothing, run every paper, write the report
# make test        build .venv if needed, run the test suite (what CI runs)
# make smoke       the whole DAG at smoke scale (seconds per rule)
# make clean       remove every output, keeping the hub downloads and conda envs
# make clean-hub   remove the hub downloads too (paper-scale checkpoints: hours to fetch again)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all

.PHONY: setup reproduce test lint format smoke clean clean-hub

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
	$(BIN)/snakemake --cores $(CORES) --profile profiles/smoke

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint

format: setup
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests
	$(BIN)/snakefmt Snakefile rules

# $(call prune,DIR,NAMES): remove everything in DIR except the entries NAMES (DIR may be absent).
prune = [ ! -d $(1) ] || find $(1) -mindepth 1 -maxdepth 1 $(foreach n,$(2),! -name $(n)) -exec rm -rf {} +

# Kept: the hub downloads (hub.cache_dir's default models/hub/cache and the FID
# Inception weights; a cache_dir outside models/ is never touched), Snakemake's
# conda envs and container images (.snakemake/conda, .snakemake/singularity; see
# `snakemake --conda-cleanup-envs`) and the tracked results/README.md.
clean:
	rm -rf data checkpoints logs benchmarks/rules mlflow.db mlflow.db.lock mlartifacts .mlflow-spool
	$(call prune,results,README.md)
	$(call prune,.snakemake,conda singularity)
	$(call prune,models,hub)
	$(call prune,models/hub,cache inception_v3_fid.safetensors)

clean-hub:
	rm -rf models/hub
