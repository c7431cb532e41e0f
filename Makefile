# The two commands a newcomer needs: `make demo` and `make test`. Both set the machine up first,
# installing Python packages only from requirements.lock (exact versions with hashes).
VENV ?= .venv
PY := $(VENV)/bin/python
# The lock resolves for every platform (x86_64 and aarch64 devices) and Python >= 3.11.
UV_COMPILE := $(VENV)/bin/uv pip compile pyproject.toml --generate-hashes --universal --python-version 3.11 --group build --quiet

.PHONY: setup demo test lint lock lock-upgrade models schemas clean

setup:
	@scripts/setup.sh

# The demo needs only Mosquitto; the tests also start victoria-metrics, InfluxDB 1.x and PostgreSQL.
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

# Re-resolve the locks after editing pyproject.toml's dependencies, keeping every pin that still
# fits (tests/test_lock.py fails while pyproject and the locks disagree). `make lock-upgrade`
# moves every package to the newest version its range allows.
lock: setup
	$(UV_COMPILE) --extra dev -o requirements.lock $(UV_FLAGS)
	$(UV_COMPILE) --extra demo --extra postgres -c requirements.lock -o docker/requirements.lock
	@echo "lock: wrote requirements.lock and docker/requirements.lock; run make test, then commit both"

lock-upgrade:
	@$(MAKE) --no-print-directory lock UV_FLAGS=--upgrade

models: setup
	$(PY) -m demokit.models --out build/models

schemas: setup
	$(PY) -m schemas.export

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
