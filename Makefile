# Two commands do all the set-up on a fresh machine (Python 3.11, pip):
#   make run     creates .venv, installs the harness, runs STUDY (default: the PMG ablation)
#   make test    creates .venv, installs the harness with its test extras, runs the test suite (all but the
#                tests marked slow: within 5 minutes on a 2-core CPU)
# CI (.ci/run) runs make test, make test-slow (the slow cluster and end-to-end tests), make docs (the site, warnings as
# errors), then make smoke: the smoke study gated against its committed baseline.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STUDY ?= studies/pmg_ablation.yaml
ARGS ?=

SMOKE_DIR ?= .smoke
BENCH_STORE := --benchmark-storage=file://baselines/benchmarks

.PHONY: install run test test-slow smoke smoke-baseline bench bench-save bench-check docs clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,cam,tune]"
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/python -m harness.run $(STUDY) $(ARGS)

test: install
	$(BIN)/python -m pytest -q -m "not slow"

# The slow tests (marked slow: simulated multi-node clusters, killed workers and drivers, every method end to end).
test-slow: install
	$(BIN)/python -m pytest -q -m slow

# The smoke study (one seed) on a fresh run directory, judged against the committed baseline of the precision it
# trained in (baselines/ci_smoke.fp32.json or ci_smoke.bf16.json): exit 1 on a regression, 2 on input it cannot judge.
smoke: install
	rm -rf $(SMOKE_DIR)
	$(BIN)/python -m harness.run studies/ci_smoke.yaml --runs-dir $(SMOKE_DIR)/runs --reports-dir $(SMOKE_DIR)/reports
	$(BIN)/python -m harness.gate $(SMOKE_DIR)/runs/ci_smoke/default 'baselines/ci_smoke.{precision}.json' \
		--junit $(SMOKE_DIR)/junit.xml

# Record the baseline: the smoke study over 5 seeds in a fresh directory, written as baselines/ci_smoke.fp32.json (the
# smoke study trains in fp32 on every machine; commit the file when a change is meant to move the numbers). Then measure
# the gate's noise on this machine, idle and loaded: python -m tests.benchmarks.gate_noise (docs/gate.md).
smoke-baseline: install
	rm -rf $(SMOKE_DIR)/baseline
	$(BIN)/python -m harness.run studies/ci_smoke.yaml --set "seeds=[0,1,2,3,4]" --runs-dir $(SMOKE_DIR)/baseline/runs \
		--reports-dir $(SMOKE_DIR)/baseline/reports
	$(BIN)/python -m harness.gate $(SMOKE_DIR)/baseline/runs/ci_smoke/default \
		--write-baseline 'baselines/ci_smoke.{precision}.json'

bench: install
	$(BIN)/python -m pytest -q tests/benchmarks --benchmark-only --benchmark-columns=min,median,mean,rounds

# Micro-benchmarks against their stored baseline (baselines/benchmarks/<machine>/), through pytest-benchmark's
# own compare: fails when a median is more than 25% slower.
bench-save: install
	$(BIN)/python -m pytest -q tests/benchmarks --benchmark-only $(BENCH_STORE) --benchmark-save=baseline

bench-check: install
	$(BIN)/python -m pytest -q tests/benchmarks --benchmark-only $(BENCH_STORE) --benchmark-compare \
		--benchmark-compare-fail=median:25% --benchmark-columns=min,median,mean,rounds

# The documentation site (docs/, mkdocs.yml): MkDocs with the Material theme, the API reference from the docstrings
# (mkdocstrings), built with warnings as errors into .site/ (open .site/index.html).
$(BIN)/.docs-installed: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[docs]"
	touch $@

docs: $(BIN)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf runs reports/*/ .pytest_cache .benchmarks $(SMOKE_DIR) .site
