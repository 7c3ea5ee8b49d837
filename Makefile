# Two commands do all the set-up on a fresh machine (Python 3.11, pip):
#   make run     creates .venv, installs the harness, runs STUDY (default: the PMG ablation)
#   make test    creates .venv, installs the harness with its test extras, runs the test suite (all but the
#                tests marked slow: within 5 minutes on a 2-core CPU)
# CI (.ci/run) runs make test, make test-slow (the slow cluster and end-to-end tests), then make smoke: the smoke
# study gated against its committed baseline.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STUDY ?= studies/pmg_ablation.yaml
ARGS ?=

SMOKE_DIR ?= .smoke
BENCH_STORE := --benchmark-storage=file://baselines/benchmarks

.PHONY: install run test test-slow smoke smoke-baseline bench bench-save bench-check clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,cam]"
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/python -m harness.run $(STUDY) $(ARGS)

test: install
	$(BIN)/python -m pytest -q -m "not slow"

# The slow tests (marked slow: simulated multi-node clusters, killed workers and drivers, every method end to end).
test-slow: install
	$(BIN)/python -m pytest -q -m slow

# The smoke study on a fresh run directory, judged against baselines/ci_smoke.json (exit 1 on a regression).
smoke: install
	rm -rf $(SMOKE_DIR)
	$(BIN)/python -m harness.run studies/ci_smoke.yaml --runs-dir $(SMOKE_DIR)/runs --reports-dir $(SMOKE_DIR)/reports
	$(BIN)/python -m harness.gate $(SMOKE_DIR)/runs/ci_smoke/default baselines/ci_smoke.json --junit $(SMOKE_DIR)/junit.xml

# Record the last smoke run as the baseline (after checking that it is a known-good run).
smoke-baseline: install
	$(BIN)/python -m harness.gate $(SMOKE_DIR)/runs/ci_smoke/default --write-baseline baselines/ci_smoke.json

bench: install
	$(BIN)/python -m pytest -q tests/benchmarks --benchmark-only --benchmark-columns=min,median,mean,rounds

# Micro-benchmarks against their stored baseline (baselines/benchmarks/<machine>/), through pytest-benchmark's
# own compare: fails when a median is more than 25% slower.
bench-save: install
	$(BIN)/python -m pytest -q tests/benchmarks --benchmark-only $(BENCH_STORE) --benchmark-save=baseline

bench-check: install
	$(BIN)/python -m pytest -q tests/benchmarks --benchmark-only $(BENCH_STORE) --benchmark-compare \
		--benchmark-compare-fail=median:25% --benchmark-columns=min,median,mean,rounds

clean:
	rm -rf runs reports/*/ .pytest_cache .benchmarks $(SMOKE_DIR)
