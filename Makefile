# Two commands for a newcomer: `make demo` and `make test`. Both install what is missing.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install browser demo test lint bench bench-demo clean down

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip

# constraints.txt pins every package (Flink's Beam caps numpy/pandas/pyarrow; torch stays the CPU build).
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	@echo "installing dependencies into $(VENV) (first time: ~3 min, ~2 GB)"
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(BIN)/pip check
	@command -v javac >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing a JDK 17 for freshrec's Flink SQL functions (streaming/java; once)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openjdk-17-jdk-headless; \
	  else echo "freshrec's Flink SQL functions need javac: sudo apt-get install openjdk-17-jdk-headless"; exit 1; fi; }
	$(BIN)/freshrec setup
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/freshrec up --demo

down:
	$(BIN)/freshrec down

# The live page's test (tests/test_ui.py) drives Debian's Chromium through Playwright.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's chromium for the browser test (once)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	  else echo "the browser test needs Debian's chromium: sudo apt-get install chromium"; exit 1; fi; }

test: install browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --doctest-modules connectors freshrec streaming jobs features serving online_learning tests

bench: install
	$(BIN)/python bench/freshness.py

bench-demo: install  # 5 minutes of `up --demo`'s traffic, then the demo's targets (exits 1 on a miss)
	$(BIN)/python bench/demo.py

clean:
	rm -rf $(VENV) .freshrec .pytest_cache .ruff_cache
