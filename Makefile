# The two commands a newcomer needs: `make demo` and `make test`. Both set the machine up first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint models schemas clean

setup:
	@scripts/setup.sh

# The demo needs only Mosquitto; the tests also need victoria-metrics and a PostgreSQL server binary.
demo:
	@WITH_TEST_SERVERS=0 scripts/setup.sh
	$(PY) -m demo

test: setup lint
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m schemas.export --check

models: setup
	$(PY) -m edge_node.demo_models --out build/models

schemas: setup
	$(PY) -m schemas.export

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
