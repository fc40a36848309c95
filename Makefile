# bkn: every command a user needs. Each target sets up its own virtual environment first.
# Run `make help` for the list.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SCALE ?= smoke
LAUNCHER ?= local
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup test test-slow test-all test-slurm demo

help:  ## list the targets
	@grep -hE '^[a-z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

# The stamp file re-runs the install whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# setuptools warns on every editable install that a folder named like the package may shadow it;
	@# this checkout is that folder, so the warning says nothing here.
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed  ## create .venv and install bkn with its pinned dependencies

test: setup  ## the default test suite (under 10 minutes on 2 CPU cores)
	$(PY) -m pytest -q

test-slow: setup  ## only the tests marked slow
	$(PY) -m pytest -q -m slow

test-all: setup  ## every test
	$(PY) -m pytest -q -m 'slow or not slow'

# The fixture of tests/test_slurm.py starts the cluster (scripts/slurm_cluster.sh) and stops it after.
test-slurm: setup  ## jobs on a one-node SLURM cluster on this machine, started and stopped (root + apt; else skipped)
	$(PY) -m pytest -q -m slurm

BENCHMARK_PRESET ?= cpu
.PHONY: benchmark
benchmark: setup  ## training-step speed and memory of BN/BRN/BKN -> results/benchmark/ (BENCHMARK_PRESET=cpu|gpu|micro|micro_gpu, ARGS=...)
	$(PY) scripts/benchmark.py --preset $(BENCHMARK_PRESET) $(ARGS)

.PHONY: gpu-check
gpu-check: setup  ## on one CUDA GPU: bf16/fp16 AMP, channels_last, compile, NCCL, options A/B, the GPU benchmarks -> results/benchmark/gpu.md, micro_gpu.md (< 10 min)
	$(PY) scripts/gpu_check.py

# --- The paper's tables and figures -> results/$(SCALE)/ (docs/results.md) -------------------------
# `make fig3 SCALE=smoke` trains what is missing (resume=auto: a finished run exits at once, a stopped
# one continues from its checkpoint), then writes the table and figure with the paper's numbers beside ours.
RUNS_DIR ?= runs/$(SCALE)
RESULTS_DIR ?= results/$(SCALE)
# Checked when a target runs (not when the Makefile is read), so other targets never trip on them.
check_settings = $(if $(filter paper smoke,$(SCALE)),,$(error SCALE=$(SCALE): use SCALE=paper or SCALE=smoke))$(if \
	$(filter local slurm,$(LAUNCHER)),,$(error LAUNCHER=$(LAUNCHER): use LAUNCHER=local or LAUNCHER=slurm))
# Smoke runs are tiny: one thread each is faster than two fighting over a busy 2-core CPU.
TRAIN = $(check_settings)$(if $(filter smoke,$(SCALE)),OMP_NUM_THREADS=1 )$(PY) train.py -m scale=$(SCALE) \
	out_dir=$(RUNS_DIR) resume=auto $(if $(filter slurm,$(LAUNCHER)),hydra/launcher=slurm)
AGGREGATE = $(PY) scripts/aggregate.py --scale $(SCALE) --runs-dir $(RUNS_DIR) --out-dir $(RESULTS_DIR)

# Figures 3, 5, 6 and 7 compare against the (256, 32) baseline, which is Table 1's BN runs.
define micro_batch_figure
	$(TRAIN) experiment=table1 normalizer=bn $(ARGS)
	$(TRAIN) experiment=$@ $(ARGS)
	$(AGGREGATE) $@
endef

.PHONY: table1 table2 table3 fig3 fig4 fig5 fig6 fig7 fig8 paper study

table1: setup  ## Table 1 -> results/<scale>/ (SCALE=paper|smoke LAUNCHER=local|slurm ARGS=overrides)
	$(TRAIN) experiment=table1 $(ARGS)
	$(AGGREGATE) table1

table2: setup  ## Table 2: training speed, BKN / BN
	$(TRAIN) experiment=table2 $(ARGS)
	$(AGGREGATE) table2

table3: setup  ## Table 3: CIFAR net, micro-batch BN / BKN against the batch-128 baseline
	$(TRAIN) experiment=table3 $(ARGS)
	$(TRAIN) experiment=table3_baseline $(ARGS)
	$(TRAIN) experiment=table3_widened $(ARGS)
	$(AGGREGATE) table3

fig3: setup  ## Figure 3: (256, 4) against (256, 32)
	$(micro_batch_figure)

fig4: setup  ## Figure 4: (256, 1), inference with batch vs population statistics
	$(TRAIN) experiment=fig4 $(ARGS)
	$(AGGREGATE) fig4

fig5: setup  ## Figure 5: (64, 8) against (256, 32)
	$(micro_batch_figure)

fig6: setup  ## Figure 6: (16, 4) against (256, 32)
	$(micro_batch_figure)

fig7: setup  ## Figure 7: (8, 2) against (256, 32)
	$(micro_batch_figure)

fig8: setup  ## Figure 8: batch vs moving variance heat maps after training
	$(TRAIN) experiment=fig8 $(ARGS)
	$(PY) scripts/fig8_statistics.py --scale $(SCALE) --runs-dir $(RUNS_DIR) --out-dir $(RESULTS_DIR)

paper: table1 table2 table3 fig3 fig4 fig5 fig6 fig7 fig8  ## every table and figure (SCALE=smoke: ~10 min on 2 CPU cores)

PART ?= all
study: setup $(if $(filter fashion%,$(PART)),data-fashion)  ## the CPU study -> results/study/ (PART=quick|baseline|g32_s2|g16_s1_seed0..2|g8_s2_seed0..2|hard_g64|hard_g32_s1|state|stall|robustness_<model>_seed0..1|robustness|all; Fashion-MNIST: PART=fashion_quick|fashion_{baseline,g16_s1,g8_s2}_seed0..2|fashion_all|fashion_peers_{baseline,g16_s1,g8_s2}_seed0..2|fashion_peers; <= ~75 min a part, quick ~10)
	$(PY) scripts/study.py $(PART) $(ARGS)
	$(PY) scripts/study_report.py

# --- make data-fashion: Fashion-MNIST's four IDX files from the Debian / Ubuntu package (docs/data.md) ---
FASHION_DIR := /usr/share/datasets/fashion-mnist
.PHONY: data-fashion
data-fashion:  ## install Fashion-MNIST (apt package dataset-fashion-mnist, into the default data.root; as root, else prints the command)
	@if [ -f $(FASHION_DIR)/t10k-labels-idx1-ubyte.gz ]; then echo "Fashion-MNIST is installed in $(FASHION_DIR)"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y dataset-fashion-mnist; \
	else echo "run as root: sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"; \
	echo "(or, with internet: python train.py data=fashion_mnist data.root=data data.download=true ...)"; exit 1; fi

# --- make demo: BN vs BKN at a micro-batch setting on the bundled digits, on a CPU (docs/training.md) ---
# (configs/experiment/demo.yaml holds its settings, so its run names carry no override hash)
demo: setup  ## BN vs BKN on the digits at (gradient 16, statistics 2) on a CPU, side by side (~3 min on 2 cores)
	OMP_NUM_THREADS=1 $(PY) train.py -m experiment=demo resume=auto
	$(PY) scripts/compare_runs.py runs/demo/cifar_net_bn_g16_s2_seed0 runs/demo/cifar_net_bkn-linear_g16_s2_seed0
