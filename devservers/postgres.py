"""A private, throwaway PostgreSQL server: `initdb` in a temp dir, `postgres` on a free port.

PostgreSQL refuses to run as root; tests and benches here may run as root (as in CI), so the server
then runs as user `postgres` in a folder that user owns (not the caller's tmp dir, which it may not
be allowed to enter). Durability is off (`fsync=off`): these servers compare code, not disks.
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

from devservers._process import ManagedProcess
from devservers.ports import free_port, wait_for_port

# Debian puts the server binaries in a versioned folder, not on PATH; take the newest installed.
PG_BIN = max(
    Path("/usr/lib/postgresql").glob("*/bin"),
    default=Path("/usr/lib/postgresql/15/bin"),
    key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
)
HOST = "127.0.0.1"
USER = "bridge"


def postgres_installed() -> bool:
    return (PG_BIN / "initdb").exists()


def _as_postgres(*argv: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)


@contextmanager
def postgres_server(*settings: str) -> Iterator[int]:
    """A started server (trust auth, superuser `bridge`); yields its port on HOST. `settings` are
    extra `name=value` server settings. Stopped (SIGTERM, then SIGKILL) and deleted when the block
    ends. Raises RuntimeError naming the package when the server binaries are not installed."""
    if not postgres_installed():
        raise RuntimeError(f"PostgreSQL server binaries not found in {PG_BIN}: apt-get install -y postgresql")
    work = Path(tempfile.mkdtemp(prefix="devservers-pg-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(work, "postgres", "postgres")
        data, port = work / "data", free_port()
        initdb = [str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", USER, "--no-sync"]
        subprocess.run(_as_postgres(*initdb), check=True, capture_output=True, timeout=60)
        with ManagedProcess("postgres", work / "pg.log") as server:
            argv = [str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(work), "-h", HOST]
            options = [arg for s in ("fsync=off", *settings) for arg in ("-c", s)]
            proc = server.launch(_as_postgres(*argv, *options))
            try:
                wait_for_port(HOST, port, 30, name="postgres", process=proc, log_path=server.console_log)
                yield port
            finally:
                server.terminate(15)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def create_database(port: int, name: str, within_s: float = 30.0) -> str:
    """`createdb NAME`, again until `within_s` while it fails: the server's port opens before it
    accepts connections ("the database system is starting up"), more so on a loaded machine. The
    last failure is raised with what createdb said. Returns the database's SQLAlchemy URL."""
    deadline = time.monotonic() + within_s
    while True:
        argv = [str(PG_BIN / "createdb"), "-h", HOST, "-p", str(port), "-U", USER, name]
        done = subprocess.run(_as_postgres(*argv), capture_output=True, text=True, timeout=within_s)
        if done.returncode == 0:
            return f"postgresql+asyncpg://{USER}@{HOST}:{port}/{name}"
        if time.monotonic() > deadline:
            raise RuntimeError(f"createdb failed (exit {done.returncode}): {done.stderr.strip()}")
        time.sleep(0.1)
