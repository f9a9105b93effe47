# `make run` and `make test` work on a fresh machine: each creates .venv and installs when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-unit test-integration test-e2e lint bench install clean i18n console-docs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/dispatchd serve

# Coverage of src/dispatchd, then the gate: each package of COV_GATE at COV_FAIL_UNDER % at least
# (pyproject.toml [tool.coverage]). A partial run (PYTEST_ARGS=-k …) needs COV_FAIL_UNDER=0.
COV_GATE := core matching reservations notifications
COV_FAIL_UNDER ?= 90

test: $(STAMP)
	$(BIN)/python -m pytest -q --cov=dispatchd --cov-report=term-missing:skip-covered $(PYTEST_ARGS)
	@failed=0; for package in $(COV_GATE); do \
		total=$$($(BIN)/coverage report --include="*/dispatchd/$$package/*" --format=total); \
		printf 'coverage %-15s %s %%\n' "$$package/" "$$total"; \
		[ "$$total" -ge "$(COV_FAIL_UNDER)" ] || { echo "  below $(COV_FAIL_UNDER) %"; failed=1; }; \
	done; exit $$failed

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
	$(BIN)/python -m bench.bench_realtime

# The console's messages: extract the English msgids from src/dispatchd/web (babel.cfg), merge them into
# each language's .po (new languages are created), then compile the .mo files the app reads.
I18N_DIR := src/dispatchd/web/locales
I18N_LOCALES := fr en

i18n: $(STAMP)
	$(BIN)/pybabel extract -F babel.cfg -o $(I18N_DIR)/messages.pot -c TRANSLATORS: --add-location=file \
		--sort-output -w 110 --project=dispatchd --copyright-holder="dispatchd contributors" src/dispatchd/web
	for l in $(I18N_LOCALES); do $(BIN)/pybabel update -i $(I18N_DIR)/messages.pot -d $(I18N_DIR) -l $$l \
		--init-missing --ignore-obsolete --ignore-pot-creation-date -w 110 || exit 1; done
	$(BIN)/pybabel compile -d $(I18N_DIR) --statistics

# Refresh docs/console/*.png and docs/console-budgets.json from the console's browser tests.
console-docs: $(STAMP)
	DISPATCHD_CONSOLE_DOCS=1 $(BIN)/python -m pytest -q -s tests/e2e/test_console_browser.py

clean:
	rm -rf $(VENV) var .pytest_cache .coverage
