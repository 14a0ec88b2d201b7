# Two commands for a newcomer: `make demo` and `make test`. Both install what is missing.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean down

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip

# constraints.txt pins every package (Flink's Beam caps numpy/pandas/pyarrow; torch stays the CPU build).
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	@echo "installing dependencies into $(VENV) (first time: ~3 min, ~2 GB)"
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(BIN)/pip check
	$(BIN)/freshrec setup
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/freshrec up --demo

down:
	$(BIN)/freshrec down

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --doctest-modules connectors freshrec streaming jobs features serving online_learning tests

bench: install
	$(BIN)/python bench/freshness.py

clean:
	rm -rf $(VENV) .freshrec .pytest_cache .ruff_cache
