"""Pytest fixtures for the real local servers of devservers/: mosquitto, victoria-metrics, InfluxDB 1.x,
a TCP proxy; and a private PostgreSQL (tests/postgres.py).

Every server runs in the test's tmp dir on a free port and is stopped at teardown even when the test
failed. A broker whose log says it dropped queued messages (docs/traps.md #1) fails the test that used
it, unless the test asked for drops on purpose.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from devservers import InfluxDB, Mosquitto, TcpProxy, VictoriaMetrics
from tests.postgres import postgres_server


class MosquittoFactory(Protocol):
    def __call__(self, *, start: bool = True, expect_drops: bool = False, **options: Any) -> Mosquitto:
        """A new broker (options: see `Mosquitto.__init__`), started unless `start=False`."""
        ...


class InfluxDBFactory(Protocol):
    def __call__(self, *, start: bool = True, auth: bool = False) -> InfluxDB:
        """A new InfluxDB 1.x (with `auth`, users required; admin credentials on the object)."""
        ...


class TcpProxyFactory(Protocol):
    def __call__(self, target_host: str, target_port: int) -> TcpProxy:
        """A started proxy forwarding to target_host:target_port."""
        ...


@dataclass
class _Brokers:
    root: Path
    brokers: list[tuple[Mosquitto, bool]] = field(default_factory=list)

    def make(self, *, start: bool = True, expect_drops: bool = False, **options: Any) -> Mosquitto:
        name = options.pop("name", f"mosquitto{len(self.brokers)}")
        broker = Mosquitto(self.root / name, name=name, **options)
        self.brokers.append((broker, expect_drops))
        if start:
            broker.start()
        return broker

    def teardown(self) -> None:
        # ExitStack stops every broker even if stopping one of them raises.
        with contextlib.ExitStack() as stack:
            for broker, _ in self.brokers:
                stack.callback(broker.stop)
        dropped = [b for b, expected in self.brokers if not expected and b.dropped_messages_logged()]
        if dropped:
            pytest.fail(
                "broker dropped queued messages (docs/traps.md #1): "
                + ", ".join(f"{b.name} log {b.log_path}" for b in dropped)
            )


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[MosquittoFactory]:
    """Start several brokers (e.g. two to bridge); all stopped and checked for drops at teardown."""
    brokers = _Brokers(tmp_path / "brokers")
    try:
        yield brokers.make
    finally:
        brokers.teardown()


@pytest.fixture
def mosquitto(mosquitto_factory: MosquittoFactory) -> Mosquitto:
    """A started broker on 127.0.0.1:<free port>, its files under the test's tmp dir."""
    return mosquitto_factory(name="mosquitto")


class _Server(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


ServerT = TypeVar("ServerT", bound=_Server)


def _serving(server: ServerT) -> Iterator[ServerT]:
    """Start `server` for a fixture's life; stopped even when the test failed."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def victoria(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    """A started victoria-metrics with an empty data dir, for this test only."""
    yield from _serving(VictoriaMetrics(tmp_path / "victoria"))


@pytest.fixture(scope="session")
def victoria_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    """One victoria-metrics for the session: tests sharing it must use their own measurement names."""
    yield from _serving(VictoriaMetrics(tmp_path_factory.mktemp("victoria_session")))


@pytest.fixture(scope="session")
def influxdb_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB]:
    """One InfluxDB 1.x (Debian's influxd) for the session: each test creates and uses its own database."""
    yield from _serving(InfluxDB(tmp_path_factory.mktemp("influxdb_session")))


@pytest.fixture
def influxdb_factory(tmp_path: Path) -> Iterator[InfluxDBFactory]:
    """Private InfluxDB 1.x servers for tests that stop them or need auth; all stopped at teardown."""
    servers: list[InfluxDB] = []

    def make(*, start: bool = True, auth: bool = False) -> InfluxDB:
        server = InfluxDB(tmp_path / f"influxdb{len(servers)}", auth=auth)
        servers.append(server)
        if start:
            server.start()
        return server

    try:
        yield make
    finally:
        with contextlib.ExitStack() as stack:
            for server in servers:
                stack.callback(server.stop)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A private PostgreSQL server for this test, its URL (skipped without the server or asyncpg)."""
    pytest.importorskip("asyncpg", reason="asyncpg is needed for PostgreSQL: pip install asyncpg")
    with postgres_server() as url:
        yield url


@pytest.fixture
def tcp_proxy() -> Iterator[TcpProxyFactory]:
    """`tcp_proxy(host, port)` starts a fault-injecting proxy to host:port; all stopped at teardown."""
    proxies: list[TcpProxy] = []

    def make(target_host: str, target_port: int) -> TcpProxy:
        proxy = TcpProxy(target_host, target_port)
        proxies.append(proxy)
        proxy.start()
        return proxy

    try:
        yield make
    finally:
        with contextlib.ExitStack() as stack:
            for proxy in proxies:
                stack.callback(proxy.stop)
