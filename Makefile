# attnbench — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# The CPU wheel of torch is pinned here so a fresh install does not pull a multi-GB CUDA build:
# PyPI's Linux torch is the CUDA one, so the CPU build comes from TORCH_INDEX, PyTorch's CPU index,
# unless the new venv's pip finds torch 2.13.0 without any index (a local wheel via find-links).
# On a CUDA machine: install your torch first, then `make install TORCH_CONSTRAINT=`.
TORCH_CONSTRAINT ?= -c constraints/cpu.txt
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
GRID    ?= cpu
EXP     ?= attnbench
ARGS    ?=
PARTITION ?=
LAUNCHER ?= slurm
PORT    ?= 5000

.PHONY: help install test test-all smoke sweep complexity repeatability overhead report ui install-server server submit cluster-check gpu-wheels gpu-check lint clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(BIN)/attnbench: pyproject.toml constraints/cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	set -o pipefail; index=""; \
	if [ -n "$(TORCH_CONSTRAINT)" ] && ! $(BIN)/pip install -q --dry-run --ignore-installed --no-deps --no-index \
	        -r constraints/cpu.txt >/dev/null 2>&1; then \
	    index="$(TORCH_INDEX)"; echo "no local torch 2.13.0 wheel: its CPU build from $$index"; fi; \
	$(BIN)/pip install -q $(TORCH_CONSTRAINT) $${index:+--extra-index-url $$index} -e '.[dev]' --config-settings editable_mode=compat 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import torch, hydra, mlflow, pytorch_lightning; print('installed torch', torch.__version__)"
	@touch $@

install: $(BIN)/attnbench ## create .venv and install attnbench with its dependencies

test: install ## run the fast test suite (slow and gpu tests excluded)
	$(BIN)/pytest -q

test-all: install ## run every CPU test, slow ones included
	$(BIN)/pytest -q -m "not gpu"

smoke: install ## toy-sized sweep of the whole pipeline (27 cells)
	$(BIN)/python -m pipeline.run -m grid=smoke $(ARGS)

sweep: install ## the default CPU sweep (grid=cpu), then its report
	$(BIN)/python -m pipeline.run -m grid=$(GRID) $(ARGS)

complexity: install ## every variant's kernel at n = 1024 ... 16384 (scaling exponents), then its report
	$(BIN)/python -m pipeline.run -m grid=complexity $(ARGS)

theory: install ## self-attention's time complexity measured: kernels over n x D x H, the two-term fit and its verdicts
	$(BIN)/python -m pipeline.run -m grid=theory $(ARGS)

.PHONY: tradeoff
tradeoff: install ## every efficient variant at three settings of its knob, quality and cost at n = 256 ... 8192 (27 min on 2 cores after make sweep, which it reuses 71 cells of), then its report
	$(BIN)/python -m pipeline.run -m grid=tradeoff $(ARGS)

repeatability: install ## the same kernel cells twice in a row: how far apart the medians land
	$(BIN)/python -m pipeline.repeatability $(ARGS)

.PHONY: noise-check
noise-check: install ## the stability flags against a CPU hog this starts itself: a small kernel grid quiet, beside a continuous and an intermittent hog (on a quiet machine; 11 min on 2 cores)
	$(BIN)/python -m pipeline.noise_check $(ARGS)

.PHONY: compare compare-commits
compare: install ## compare two sweeps cell by cell: make compare BASE=<experiment or sweep id> NEW=<...> (ARGS=--ignore trainer, --threshold 0.05, --new-uri ...); exit 1 on a regression
	@[ -n "$(BASE)" ] && [ -n "$(NEW)" ] || { echo "make compare: give BASE=<experiment or sweep id> NEW=<...>" >&2; exit 2; }
	$(BIN)/python -m pipeline.compare --base $(BASE) --new $(NEW) $(ARGS)

compare-commits: install ## a grid at git ref BASE (a worktree) and at the working tree, interleaved cell by cell, then compared: make compare-commits BASE=HEAD~1 [GRID=compare] [ARGS=--rounds 2]
	@[ -n "$(BASE)" ] || { echo "make compare-commits: give BASE=<git ref>" >&2; exit 2; }
	$(BIN)/python -m pipeline.compare.commits --base $(BASE) --grid $(if $(filter command line environment,$(origin GRID)),$(GRID),compare) $(ARGS)

.PHONY: conformance
conformance: install ## check a mixer before benchmarking it, one line per check: make conformance TARGET=pkg.module.Class (your own, as model=custom) or MODEL=<variant> [ARGS="model.window=64 --checks causality"]; exit 1 on a failure
	@[ -n "$(TARGET)$(MODEL)" ] || { echo "make conformance: give TARGET=pkg.module.Class or MODEL=<variant>" >&2; exit 2; }
	$(BIN)/python -m pipeline.conformance $(if $(TARGET),model=custom model._target_=$(TARGET),model=$(MODEL)) $(ARGS)

.PHONY: replay
replay: install ## record the cells a sweep kept in its spool (store unreachable, or tracking=offline), each once: make replay [DIR=<sweep folder>] [ARGS=--uri ...]; every listed spool without DIR
	$(BIN)/python -m pipeline.replay $(DIR) $(ARGS)

overhead: install ## the harness's per-cell overhead, spawn vs fork, and the pipeline's figures against a bare loop
	$(BIN)/python -m pipeline.overhead $(ARGS)

report: install ## report of experiment EXP (latest run per cell) into reports/
	$(BIN)/python -m pipeline.report --experiment $(EXP) $(ARGS)

ui: install ## MLflow UI on 127.0.0.1:$(PORT) over the project's store, opening on the runs; prints the latest sweep's addresses
	-$(BIN)/python -m pipeline.ui --experiment $(EXP) --port $(PORT)
	$(BIN)/mlflow ui --app-name attnbench --host 127.0.0.1 --port $(PORT) --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}

install-server: install ## add the `server` extra to .venv: the PostgreSQL driver (psycopg 3) that make server needs for a postgresql:// store
	$(BIN)/pip install -q $(TORCH_CONSTRAINT) -e '.[server]' --config-settings editable_mode=compat 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import psycopg; print('installed psycopg', psycopg.__version__)"

server: install ## MLflow tracking server on 127.0.0.1:$(PORT) for many writers (MLFLOW_BACKEND_STORE_URI, MLFLOW_HOST: docs/scaling_out.md)
	PORT=$(PORT) scripts/mlflow_server.sh

submit: install ## sweep on SLURM as one job array: make submit GRID=gpu PARTITION=gpu; GRID= ARGS='model=vanilla seq_len=512,1024'; LAUNCHER=slurm_cpu (needs make server)
	@command -v sbatch >/dev/null || { echo "make submit: sbatch not found: run it on a SLURM login node" >&2; exit 2; }
	$(BIN)/python -m pipeline.run -m $(if $(filter-out null,$(GRID)),grid=$(GRID)) hydra/launcher=$(LAUNCHER) tracking=server $(if $(PARTITION),hydra.launcher.partition=$(PARTITION)) $(ARGS)

cluster-check: ## as root on Debian/Ubuntu: a real single-node SLURM + PostgreSQL-backed server, real submissions (ARGS=--up: just start them)
	bash scripts/ci_cluster.sh $(ARGS)

gpu-wheels: ## download the wheels the GPU machine lacks into .whl/ (ARGS=--verify: import them in a Python 3.12)
	bash scripts/gpu_wheels.sh $(ARGS)

gpu-check: ## on a CUDA machine: prove the CUDA side in one short run (ARGS=--dry-run: the plan, anywhere)
	bash scripts/gpu_check.sh $(ARGS)

clean: ## remove Hydra outputs and caches (keeps mlflow.db and reports)
	rm -rf outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

lint: install ## ruff over the code
	$(BIN)/ruff check pipeline models tests
