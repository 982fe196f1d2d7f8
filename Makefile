# The commands the README documents.  `make demo` and `make test` set up .venv first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint

$(BIN)/.installed: builder/requirements.txt requirements-dev.txt pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e . -e './client[plot]' -r requirements-dev.txt
	touch $@

setup: $(BIN)/.installed

demo: setup  ## one real edit on the tiny random-weight model; writes outputs/local_test-0.png
	TINY_MODEL=1 $(BIN)/python handler.py

lint: setup
	$(BIN)/ruff check .

test: lint  ## lint, then the whole suite on the CPU
	$(BIN)/python -m pytest -q
