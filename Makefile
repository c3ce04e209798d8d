# Kiln: `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kiln-installed

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

# torch is pinned first: a looser requirement could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/kiln demo

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest

test-fast: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not slow and not chaos and not multinode"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
