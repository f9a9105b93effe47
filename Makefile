# `make run` and `make test` work on a fresh machine: each creates .venv and installs when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-unit test-integration test-e2e lint bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/dispatchd serve

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# One folder of the suite (`make test` runs all three): unit is seconds, e2e starts real processes.
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration $(PYTEST_ARGS)

test-e2e: $(STAMP)
	$(BIN)/python -m pytest -q tests/e2e $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.bench_matching
	$(BIN)/python -m bench.bench_reservations
	$(BIN)/python -m bench.bench_notifications
	$(BIN)/python -m bench.bench_outbox_peak

clean:
	rm -rf $(VENV) var .pytest_cache
