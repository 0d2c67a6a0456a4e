# mha-serve: `make` prints this help; `make test` is the only command a newcomer needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup test soak lint format serve bench bench-service bench-tracing docker-test

help:  ## show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the project with its dev extra (CPU torch pinned)

test: $(STAMP)  ## run the whole test suite (sets up on first use)
	$(PY) -m pytest -q -m "not soak"

SOAK_SECONDS ?= 60
soak: $(STAMP)  ## mixed traffic at concurrency 64 for SOAK_SECONDS (default 60) against a real uvicorn, then SIGTERM
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest -q -s -m soak tests/soak

lint: $(STAMP)  ## ruff check and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

serve: $(STAMP)  ## run mha-serve on 127.0.0.1:8000 with the built-in default model (sets up on first use)
	$(VENV)/bin/mha-serve

bench: $(STAMP)  ## attention core benchmark (bench/core.py)
	$(PY) bench/core.py

bench-service: $(STAMP)  ## HTTP benchmark with wrk (bench/service.py; needs the wrk package)
	$(PY) bench/service.py

bench-tracing: $(STAMP)  ## what tracing costs: off, on, sampled-out and the code before it, front-bound (bench/tracing.py)
	$(PY) bench/tracing.py

docker-test: $(STAMP)  ## build the Docker image offline, run it and a 2-replica compose stack behind nginx (docker/ci.sh; root)
	bash docker/ci.sh
