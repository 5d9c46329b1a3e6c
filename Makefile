# Two entry points for a fresh machine: `make run` (the pipeline) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# No outbound traffic, ever.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export RAY_USAGE_STATS_ENABLED := 0
export AWS_EC2_METADATA_DISABLED := true

.PHONY: install run repro test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first: the CPU build on local disk. Then everything else in ONE command,
	# constrained so nothing upgrades torch (and moto keeps s3fs's botocore pin).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/python -m flows.run_local

# The DVC graph alone (no Prefect): stage commands call `meduet`, so the venv goes on PATH.
repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/harmonize.py

clean:
	rm -rf $(VENV) .work
