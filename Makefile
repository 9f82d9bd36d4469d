# chatforge: the two commands of the README's Quickstart are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.chatforge-installed

.PHONY: demo test lint proto diagrams clean

# The venv is (re)built when pyproject.toml changes. torch is pinned to a range that
# pip satisfies with the CPU wheel; see README "Dependencies".
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

# Under CI (CI=true) podman, runc, debootstrap, haproxy, plantuml and graphviz are installed from Debian's
# packages and a local base image is built (cached in podman's storage) for the deployment tests;
# a throwaway PostgreSQL from Debian's packages is started for the
# conversation store's PostgreSQL test; elsewhere that test skips unless
# CHATFORGE_TEST_PG_URL is set. A failed start only skips those tests. Under CI, Debian's
# Chromium (and CJK fonts) are installed for the chat-page browser test, which skips without it.
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools scripts
	$(BIN)/lint-imports  # import contracts in pyproject.toml: no upward import, no cycle
	@if [ -n "$$CI" ]; then \
	  timeout 900 bash tools/ci_install_containers.sh >/dev/null \
	    || echo "container tools or base image unavailable: tests/scenarios/test_image.py says why"; \
	fi
	@if [ -n "$$CI" ]; then \
	  timeout 600 bash tools/ci_install_browser.sh || echo "Chromium for tests: unavailable (the browser test skips)"; \
	fi
	@if [ -n "$$CI" ] && [ -z "$$CHATFORGE_TEST_PG_URL" ]; then \
	  CHATFORGE_TEST_PG_URL=$$(timeout 300 bash tools/start_postgres.sh || true); export CHATFORGE_TEST_PG_URL; \
	  echo "PostgreSQL for tests: $${CHATFORGE_TEST_PG_URL:-unavailable (its tests skip)}"; \
	fi; \
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ -n "$$CI" ]; then bash tools/start_postgres.sh --stop >/dev/null 2>&1 || true; fi; \
	exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools scripts

proto: $(STAMP)
	$(BIN)/python tools/gen_proto.py

# PlantUML sources in docs/diagrams/ -> SVG + PNG (Debian's plantuml, offline).
diagrams:
	bash tools/render_diagrams.sh

clean:
	rm -rf runs/demo .pytest_cache
