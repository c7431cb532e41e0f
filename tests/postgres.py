"""A private PostgreSQL for tests (devservers/postgres.py), with the `registry` database the bridge
uses; the test is skipped where the server binaries are not installed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from devservers.postgres import PG_BIN, create_database, postgres_installed
from devservers.postgres import postgres_server as _server


@contextmanager
def postgres_server() -> Iterator[str]:
    """A started server with an empty database `registry` owned by `bridge`; yields its SQLAlchemy URL."""
    if not postgres_installed():
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN}")
    with _server() as port:
        yield create_database(port, "registry")
