#!/usr/bin/env bash
# Prepare this machine for `make demo` / `make test`: system servers the demo and the tests start
# (Mosquitto; victoria-metrics for the InfluxDB v2 write API; Debian's InfluxDB 1.x, whose InfluxQL
# runs the dashboard's queries), then the venv, then (unless WITH_LABEL_STUDIO=0) Label Studio in a
# venv of its own for tests/test_label_studio.py.
# Idempotent: installs only what is missing, rebuilds a venv only when its lock or the project changed.
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
  # Debian 12's `influxdb` is InfluxDB 1.6.7 (/usr/bin/influxd). The tests start their own influxd on
  # free ports (devservers/influxdb.py); where systemd runs, the package also enables a system
  # service on 8086/8088, which the tests never use (stop it with `systemctl disable --now influxdb`).
  command -v influxd >/dev/null 2>&1 || [ -x /usr/bin/influxd ] || NEED_PKGS+=(influxdb)
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
# Python packages come only from requirements.lock: exact versions, every file checked by hash.
# pyproject.toml keeps compatible ranges for people who install the packages as libraries.
LOCK=requirements.lock
if [ ! -f "$LOCK" ]; then
  echo "setup: $LOCK is missing: restore it (git checkout -- $LOCK), or resolve a new one with 'make lock'" >&2
  exit 1
fi
# A venv is rebuilt when the lock or the project's metadata (dependencies, entry points, packages)
# changed, so it never keeps a package the lock no longer holds; tool settings do not count.
want="$("$PYTHON" - "$LOCK" <<'PY'
import hashlib, json, sys, tomllib
meta = tomllib.load(open("pyproject.toml", "rb"))
key = [meta["project"], meta["build-system"], meta.get("tool", {}).get("setuptools")]
print(hashlib.sha256(open(sys.argv[1], "rb").read() + json.dumps(key, sort_keys=True).encode()).hexdigest())
PY
)"
stamp="$VENV/.installed"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: $LOCK or pyproject.toml changed: rebuilding $VENV"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV" || {
    echo "setup: 'python3 -m venv' failed: install the venv module (apt-get install -y python3-venv)" >&2
    exit 1
  }
  echo "setup: installing the locked packages into $VENV (about a minute)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r "$LOCK"
  # The project itself, editable, built by the locked setuptools (no download at build time).
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi

# Label Studio, for tests/test_label_studio.py's round trip through a real server: its own venv from
# its own lock (about 160 pins that would fight requirements.lock's; ~1 GB). Not for `make demo`.
if [ "${WITH_LABEL_STUDIO:-1}" != 0 ]; then
  LS_VENV=.venv-label-studio
  LS_LOCK=requirements-label-studio.lock
  if [ ! -f "$LS_LOCK" ]; then
    echo "setup: $LS_LOCK is missing: restore it (git checkout -- $LS_LOCK), or resolve a new one with 'make lock-label-studio'" >&2
    exit 1
  fi
  ls_want="$(sha256sum "$LS_LOCK" | cut -d' ' -f1)"
  ls_stamp="$LS_VENV/.installed"
  # A venv without the stamp is a half-finished install (interrupted, or failed): start it over.
  if [ -e "$LS_VENV" ] && [ "$(cat "$ls_stamp" 2>/dev/null)" != "$ls_want" ]; then
    echo "setup: $LS_LOCK changed (or its last install did not finish): rebuilding $LS_VENV"
    rm -rf "$LS_VENV"
  fi
  if [ ! -e "$LS_VENV" ]; then
    echo "setup: installing Label Studio for its round-trip test (about 2 minutes)"
    "$PYTHON" -m venv "$LS_VENV"
    "$LS_VENV/bin/python" -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r "$LS_LOCK"
    echo "$ls_want" > "$ls_stamp"
  fi
fi
