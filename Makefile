# Two commands do all the set-up on a fresh machine (Python 3.11, pip):
#   make run     creates .venv, installs the harness, runs STUDY (default: the PMG ablation)
#   make test    creates .venv, installs the harness with its test extras, runs the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STUDY ?= studies/pmg_ablation.yaml
ARGS ?=

.PHONY: install run test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,cam]"
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/python -m harness.run $(STUDY) $(ARGS)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m pytest -q tests/benchmarks --benchmark-only --benchmark-columns=min,median,mean,rounds

clean:
	rm -rf runs reports/*/ .pytest_cache .benchmarks
