# The two commands a newcomer needs: `make demo` and `make test`. Both set the machine up first,
# installing Python packages only from requirements.lock (exact versions with hashes), and for the
# tests Label Studio into .venv-label-studio from requirements-label-studio.lock.
VENV ?= .venv
PY := $(VENV)/bin/python
# The lock resolves for every platform (x86_64 and aarch64 devices) and Python >= 3.11.
UV_COMPILE := $(VENV)/bin/uv pip compile pyproject.toml --generate-hashes --universal --python-version 3.11 --group build --quiet

.PHONY: setup venv demo test lint lock lock-upgrade lock-label-studio models schemas clean

setup:
	@scripts/setup.sh

# Only the project's venv (and Mosquitto), for targets that need neither the test servers nor Label Studio.
venv:
	@WITH_TEST_SERVERS=0 WITH_LABEL_STUDIO=0 scripts/setup.sh

# The demo needs only Mosquitto; the tests also start victoria-metrics, InfluxDB 1.x and PostgreSQL,
# and a Label Studio server from its own venv (.venv-label-studio, see tests/test_label_studio.py).
demo:
	@WITH_TEST_SERVERS=0 WITH_LABEL_STUDIO=0 scripts/setup.sh
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
lock: venv
	$(UV_COMPILE) --extra dev -o requirements.lock $(UV_FLAGS)
	$(UV_COMPILE) --extra demo --extra postgres -c requirements.lock -o docker/requirements.lock
	@echo "lock: wrote requirements.lock and docker/requirements.lock; run make test, then commit both"

lock-upgrade:
	@$(MAKE) --no-print-directory lock UV_FLAGS=--upgrade

# Label Studio's own lock, for .venv-label-studio only (its pins would fight requirements.lock's):
# after changing the version in requirements-label-studio.in, re-resolve it here.
lock-label-studio: venv
	$(VENV)/bin/uv pip compile requirements-label-studio.in --generate-hashes --universal --python-version 3.11 \
		--quiet -o requirements-label-studio.lock $(UV_FLAGS)
	@echo "lock: wrote requirements-label-studio.lock; run make test, then commit it"

models: venv
	$(PY) -m demokit.models --out build/models

schemas: venv
	$(PY) -m schemas.export

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
