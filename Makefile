# Two entry points for a fresh machine: `make train` and `make test`.
# Both create .venv and install the project (offline-friendly: torch==2.13.0 is on disk).
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: setup train test test-avx2 test-slow test-compiled lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $(STAMP)

# The main job: train the paper's model with the default config (configs/bmnist_paper.yaml).
train: $(STAMP)
	$(VENV)/bin/bihm train $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

# Another CPU's rounding on this one: the modules whose numbers are compared across runs
# (1 and 2 processes, batch sizes, exact values) again, with ATen's and the BLAS's kernels
# held to AVX2 (tests/rounding.py says why the numbers may differ, and by how much).
# tests/cpu_isa.py checks that each library took its switch (MKL honours its own on Intel
# CPUs only; elsewhere it runs at most AVX2 anyway).
AVX2_ENV := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
NUMERIC_TESTS := tests/test_eval.py tests/test_labels.py tests/test_model_api.py \
	tests/test_cli.py::test_ddp_training_with_two_gloo_processes

test-avx2: $(STAMP)
	$(AVX2_ENV) $(VENV)/bin/python -m tests.cpu_isa --avx2
	$(AVX2_ENV) $(VENV)/bin/pytest -q $(NUMERIC_TESTS)

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

# Compiled mode (train.compile) against eager alone: each test compiles a tiny model (tens
# of seconds); `make test` runs them too.
test-compiled: $(STAMP)
	$(VENV)/bin/pytest -q -m compiled

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
