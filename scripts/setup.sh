#!/usr/bin/env bash
# Prepare this machine for `make demo` / `make test`: system servers the demo and the tests start
# (Mosquitto, victoria-metrics as the InfluxDB-protocol test server), then the venv.
# Idempotent: installs only what is missing, reinstalls the venv only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
NEED_PKGS=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || NEED_PKGS+=(mosquitto)
if [ "${WITH_TEST_SERVERS:-1}" = 1 ]; then
  # The registry tests start a private PostgreSQL server (never the one on :5432).
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || NEED_PKGS+=(postgresql)
  command -v victoria-metrics >/dev/null 2>&1 || [ -x /usr/bin/victoria-metrics ] || NEED_PKGS+=(victoria-metrics)
fi

if [ "${#NEED_PKGS[@]}" -gt 0 ]; then
  echo "setup: installing ${NEED_PKGS[*]} with apt-get"
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: cannot install ${NEED_PKGS[*]}: run as root on Debian/Ubuntu, or install them yourself:" >&2
    echo "       sudo apt-get install -y ${NEED_PKGS[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${NEED_PKGS[@]}" >/dev/null
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: $PYTHON is $("$PYTHON" --version 2>&1); Python 3.11+ is needed (set PYTHON=python3.11)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV" || {
    echo "setup: 'python3 -m venv' failed: install the venv module (apt-get install -y python3-venv)" >&2
    exit 1
  }
fi
stamp="$VENV/.installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing the project and its test tools into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
