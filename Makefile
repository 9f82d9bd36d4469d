# chatforge: the two commands of the README's Quickstart are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.chatforge-installed

.PHONY: demo test lint proto clean

# The venv is (re)built when pyproject.toml changes. torch is pinned to a range that
# pip satisfies with the CPU wheel; see README "Dependencies".
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools

proto: $(STAMP)
	$(BIN)/python tools/gen_proto.py

clean:
	rm -rf runs/demo .pytest_cache
