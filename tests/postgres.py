"""A private, throwaway PostgreSQL server for tests: `initdb` in a temp dir, `postgres` on a free port.

PostgreSQL refuses to run as root; tests here run as root (as in CI), so the server runs as user
`postgres` in a folder that user owns (not the test's tmp dir, which it may not be allowed to enter).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from devservers import ManagedProcess, free_port, wait_for_port

# Debian puts the server binaries in a versioned folder, not on PATH; take the newest installed.
PG_BIN = max(
    Path("/usr/lib/postgresql").glob("*/bin"),
    default=Path("/usr/lib/postgresql/15/bin"),
    key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
)
HOST = "127.0.0.1"


def _as_postgres(*argv: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)


def _run(*argv: str, timeout: float) -> None:
    subprocess.run(_as_postgres(*argv), check=True, capture_output=True, timeout=timeout)


def _createdb(port: int, within_s: float) -> None:
    """`createdb registry`, again until `within_s` while it fails: the server's port opens before it
    accepts connections ("the database system is starting up"), more so on a loaded machine. The
    last failure is raised with what createdb said."""
    deadline = time.monotonic() + within_s
    while True:
        argv = [str(PG_BIN / "createdb"), "-h", HOST, "-p", str(port), "-U", "bridge", "registry"]
        done = subprocess.run(_as_postgres(*argv), capture_output=True, text=True, timeout=within_s)
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"createdb failed (exit {done.returncode}): {done.stderr.strip()}")
        time.sleep(0.1)


@contextmanager
def postgres_server() -> Iterator[str]:
    """A started server with an empty database `registry` owned by `bridge`; yields its SQLAlchemy
    URL. Stopped (SIGTERM, then SIGKILL) and deleted when the block ends. Skips the test when the
    server binaries are not installed."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN}")
    work = Path(tempfile.mkdtemp(prefix="bridge-pg-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(work, "postgres", "postgres")
        data, port = work / "data", free_port()
        _run(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "bridge", "--no-sync", timeout=60)
        with ManagedProcess("postgres", work / "pg.log") as server:
            argv = [str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(work), "-h", HOST]
            proc = server.launch(_as_postgres(*argv, "-c", "fsync=off"))
            try:
                wait_for_port(HOST, port, 30, name="postgres", process=proc, log_path=server.console_log)
                _createdb(port, 30)
                yield f"postgresql+asyncpg://bridge@{HOST}:{port}/registry"
            finally:
                server.terminate(15)
    finally:
        shutil.rmtree(work, ignore_errors=True)
