# mha-serve: `make` prints this help; `make test` is the only command a newcomer needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup test soak lint format serve bench bench-report bench-targets bench-core bench-service bench-tracing bench-procs bench-front bench-app-cpu bench-gpu \
	docker-test docker-build-cuda protos docs docs-serve perf-analyzer bench-protocols

help:  ## show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,bench,docs]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the project with its dev, bench and docs extras (CPU torch pinned)

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

docs: $(STAMP)  ## build the documentation site into site/ (mkdocs build --strict: a broken link fails)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

DOCS_PORT ?= 8002
docs-serve: $(STAMP)  ## serve the documentation on 127.0.0.1:DOCS_PORT (default 8002), rebuilt on every change
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve --dev-addr 127.0.0.1:$(DOCS_PORT)

BENCH_ARGS ?=
bench: $(STAMP)  ## the standard benchmark set into bench-results/ (bench/run.py; ~14 min, BENCH_ARGS=--quick ~3; needs wrk)
	$(PY) bench/run.py $(BENCH_ARGS)

bench-report: $(STAMP)  ## bench-results/ into docs/performance.md and docs/images/bench-*.png (bench/page.py)
	$(PY) bench/page.py

bench-targets: $(STAMP)  ## issue 20's ratios side by side in one run: no-op GPU case, front-bound, real model (bench/run.py --targets)
	$(PY) bench/run.py --targets --out bench-results/targets

bench-core: $(STAMP)  ## the forward pass against its floors (bench/core.py)
	$(PY) bench/core.py

bench-service: $(STAMP)  ## HTTP benchmark with wrk (bench/service.py; needs the wrk package)
	$(PY) bench/service.py

bench-tracing: $(STAMP)  ## what tracing costs: off, on, sampled-out and the code before it, front-bound (bench/tracing.py)
	$(PY) bench/tracing.py

bench-front: $(STAMP)  ## one front-end process's cost per request, against FastAPI/ASGI echoes (bench/front.py; --against REV; needs wrk)
	$(PY) bench/front.py

bench-app-cpu: $(STAMP)  ## the app's own CPU a request, in-process, beside a bare FastAPI route (bench/app_cpu.py; to 0.3 us)
	taskset -c 0 $(PY) bench/app_cpu.py 2>/dev/null

docker-test: $(STAMP)  ## build the Docker image offline, run it and a 2-replica compose stack behind nginx (docker/ci.sh; root)
	bash docker/ci.sh

PROTO_DIR := service/frontend/triton_proto
protos: $(STAMP)  ## regenerate the gRPC modules in service/frontend/triton_proto from Triton's vendored .proto files
	$(PY) -m pip install --quiet -c constraints.txt -e '.[protos]'
	$(PY) -m grpc_tools.protoc -I $(PROTO_DIR) --python_out=$(PROTO_DIR) --pyi_out=$(PROTO_DIR) \
		--grpc_python_out=$(PROTO_DIR) $(PROTO_DIR)/model_config.proto $(PROTO_DIR)/grpc_service.proto
	# protoc writes top-level imports (import model_config_pb2); the modules live in a package
	sed -i -E 's/^import (model_config_pb2|grpc_service_pb2) as /from . import \1 as /' $(PROTO_DIR)/*_pb2*.py $(PROTO_DIR)/*_pb2*.pyi

perf-analyzer:  ## install Triton's perf_analyzer into .cache/perf_analyzer (bench/perf_analyzer.sh; apt libb64-0d)
	bash bench/perf_analyzer.sh --install

bench-protocols: $(STAMP)  ## gRPC vs v2 HTTP binary vs /attend base64 at c=1,8,32,64 (bench/protocols.py; perf_analyzer, wrk)
	$(PY) bench/protocols.py

docker-build-cuda: $(STAMP)  ## build and check the CUDA image mha-serve:cuda offline (docker/cuda.sh; root; 2.7 GB download, 5 GB image, ~5 min, ~21 GB disk: outside CI)
	bash docker/cuda.sh

bench-procs: $(STAMP)  ## MHA_WORKERS front ends + model process vs one process, real model, wrk c=32 (bench/procs.py)
	$(PY) bench/procs.py

bench-gpu: $(STAMP)  ## one table on a CUDA host: device tests, core vs floor, weights vs bandwidth, decode vs bandwidth, GPU paths, service (bench/gpu.py; < 8 min)
	$(PY) bench/gpu.py
