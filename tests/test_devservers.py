"""The real-server harness itself: mosquitto (QoS 1, persistence, queue limits), victoria-metrics, TcpProxy."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import aiomqtt
import paho.mqtt.client as mqtt
import pytest
from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.write_precision import WritePrecision
from paho.mqtt.enums import CallbackAPIVersion

from devservers import Mosquitto, MosquittoError, TcpProxy, VictoriaError, VictoriaMetrics
from devservers.victoria import find_victoria_metrics
from tests.plugin_servers import MosquittoFactory, TcpProxyFactory

WAIT_S = 10.0


class Paho:
    """A paho 2.x client on its own network thread, with events a test can wait on."""

    def __init__(self, client_id: str, *, clean_session: bool = True) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.session_present: bool | None = None
        self._connects = 0
        self._disconnects = 0
        self._changed = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self._subscribed: set[int] = set()

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags, rc: object, props: object
    ) -> None:
        with self._changed:
            self.session_present = bool(flags.session_present)
            self._connects += 1
            self._changed.notify_all()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: mqtt.DisconnectFlags, rc: object, props: object
    ) -> None:
        with self._changed:
            self._disconnects += 1
            self._changed.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, rcs: object, props: object) -> None:
        with self._changed:
            self._subscribed.add(mid)
            self._changed.notify_all()

    def _wait(self, predicate: Callable[[], bool], what: str) -> None:
        with self._changed:
            assert self._changed.wait_for(predicate, timeout=WAIT_S), f"timed out waiting for {what}"

    @property
    def connects(self) -> int:
        with self._changed:
            return self._connects

    def connect(self, host: str, port: int, *, keepalive: int = 60) -> None:
        before = self.connects
        self.client.connect(host, port, keepalive=keepalive)
        self.client.loop_start()
        self.wait_connects(before + 1)

    def wait_connects(self, count: int) -> None:
        self._wait(lambda: self._connects >= count, f"connection #{count}")

    def wait_disconnects(self, count: int) -> None:
        self._wait(lambda: self._disconnects >= count, f"disconnection #{count}")

    def subscribe(self, topic: str, qos: int = 1) -> None:
        _, mid = self.client.subscribe(topic, qos=qos)
        self._wait(lambda: mid in self._subscribed, f"SUBACK for {topic}")

    def publish_all(self, topic: str, payloads: list[bytes], qos: int = 1) -> None:
        infos = [self.client.publish(topic, p, qos=qos) for p in payloads]
        for info in infos:
            info.wait_for_publish(timeout=WAIT_S)
            assert info.is_published(), f"no PUBACK for mid {info.mid}"

    def receive(self, count: int) -> list[mqtt.MQTTMessage]:
        got: list[mqtt.MQTTMessage] = []
        try:
            while len(got) < count:
                got.append(self.messages.get(timeout=WAIT_S))
        except queue.Empty:
            pytest.fail(f"received {len(got)} of {count} messages within {WAIT_S}s")
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class MakeClient(Protocol):
    def __call__(self, client_id: str, *, clean_session: bool = True) -> Paho: ...


@pytest.fixture
def clients() -> Iterator[MakeClient]:
    """Paho clients created through it are disconnected at teardown."""
    made: list[Paho] = []

    def make(client_id: str, *, clean_session: bool = True) -> Paho:
        made.append(Paho(client_id, clean_session=clean_session))
        return made[-1]

    yield make
    for client in made:
        client.close()


# -- mosquitto ---------------------------------------------------------------------------------------


def test_mosquitto_qos1_round_trip_and_timestamped_log(mosquitto: Mosquitto, clients: MakeClient) -> None:
    sub, pub = clients("sub"), clients("pub")
    sub.connect(mosquitto.host, mosquitto.port)
    sub.subscribe("t/round")
    pub.connect(mosquitto.host, mosquitto.port)
    payloads = [f"m{i}".encode() for i in range(20)]

    pub.publish_all("t/round", payloads)

    received = sub.receive(len(payloads))
    assert [m.payload for m in received] == payloads
    assert {m.qos for m in received} == {1}
    assert mosquitto.port != 1883
    log_text = mosquitto.log_text()
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d: New client connected .* as sub ", log_text, re.M)


def test_mosquitto_config_is_deliberate(mosquitto: Mosquitto) -> None:
    conf = mosquitto.conf_path.read_text().splitlines()
    assert "max_queued_messages 1000000" in conf
    assert "max_queued_bytes 0" in conf
    assert "set_tcp_nodelay true" in conf
    assert ("user root" in conf) == (os.geteuid() == 0)
    assert not any(line.startswith("persistent_client_expiration") for line in conf)


def test_persistent_session_survives_broker_restart(mosquitto: Mosquitto, clients: MakeClient) -> None:
    sub = clients("persistent-sub", clean_session=False)
    sub.connect(mosquitto.host, mosquitto.port)
    sub.subscribe("t/persist")
    sub.close()
    pub = clients("pub")
    pub.connect(mosquitto.host, mosquitto.port)
    payloads = [f"p{i}".encode() for i in range(50)]
    pub.publish_all("t/persist", payloads)
    pub.close()

    mosquitto.stop()
    assert mosquitto.persistence_file.stat().st_size > 0
    mosquitto.start()

    back = clients("persistent-sub", clean_session=False)
    back.connect(mosquitto.host, mosquitto.port)
    assert back.session_present is True
    assert sorted(m.payload for m in back.receive(len(payloads))) == sorted(payloads)
    log_text = mosquitto.log_text()
    assert "Saving in-memory database" in log_text
    assert "Permission denied" not in log_text


def test_queue_limit_is_raised_above_stock_1000(mosquitto: Mosquitto, clients: MakeClient) -> None:
    """Stock mosquitto would keep 1000 of these for the offline subscriber and drop the rest."""
    sub = clients("offline-sub", clean_session=False)
    sub.connect(mosquitto.host, mosquitto.port)
    sub.subscribe("t/backlog")
    sub.close()
    pub = clients("pub")
    pub.connect(mosquitto.host, mosquitto.port)
    payloads = [f"b{i}".encode() for i in range(2500)]
    pub.publish_all("t/backlog", payloads)

    back = clients("offline-sub", clean_session=False)
    back.connect(mosquitto.host, mosquitto.port)

    assert [m.payload for m in back.receive(len(payloads))] == payloads
    assert not mosquitto.dropped_messages_logged()


def test_dropped_messages_are_detected(mosquitto_factory: MosquittoFactory, clients: MakeClient) -> None:
    broker = mosquitto_factory(name="tiny", max_queued_messages=3, expect_drops=True)
    sub = clients("offline-sub", clean_session=False)
    sub.connect(broker.host, broker.port)
    sub.subscribe("t/drop")
    sub.close()
    pub = clients("pub")
    pub.connect(broker.host, broker.port)

    pub.publish_all("t/drop", [b"x"] * 10)
    pub.close()
    broker.stop()  # the log is complete once the broker has exited

    assert broker.dropped_messages_logged()
    assert "max_queued_messages 3" in broker.conf_path.read_text()


def test_mosquitto_start_failure_reports_log_and_leaves_no_process(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "bad", extra_conf="no_such_option 1")
    with pytest.raises(MosquittoError, match="no_such_option"):
        broker.start(timeout=5)
    assert not broker.alive


def test_extra_listener_shares_the_broker(mosquitto_factory: MosquittoFactory, clients: MakeClient) -> None:
    broker = mosquitto_factory(name="two-ports", start=False)
    second_port = broker.add_listener(lines=("allow_anonymous true",))
    broker.start()
    sub = clients("sub")
    sub.connect(broker.host, second_port)
    sub.subscribe("t/two")
    pub = clients("pub")
    pub.connect(broker.host, broker.port)

    pub.publish_all("t/two", [b"across"])

    assert [m.payload for m in sub.receive(1)] == [b"across"]
    assert f"listener {second_port} 127.0.0.1" in broker.conf_path.read_text()


class _StockUserBroker(Mosquitto):
    """The same broker without `user root`: what a stock config does when started as root."""

    def render_config(self) -> str:
        return super().render_config().replace("user root\n", "")


@pytest.mark.skipif(os.geteuid() != 0, reason="mosquitto only switches users when started as root")
def test_broker_that_cannot_write_its_dir_is_refused(tmp_path: Path) -> None:
    """docs/traps.md #7: without `user root` mosquitto runs on but cannot write log or persistence."""
    broker = _StockUserBroker(tmp_path / "stock-user")
    broker.work_dir.mkdir(parents=True)
    broker.work_dir.chmod(0o700)
    with pytest.raises(MosquittoError, match=r"Unable to open|Permission denied"):
        broker.start(timeout=5)
    assert not broker.alive


def test_mosquitto_kill_then_start_on_same_port(mosquitto: Mosquitto) -> None:
    port, pid = mosquitto.port, mosquitto.pid
    mosquitto.kill()
    assert not mosquitto.alive
    mosquitto.start()
    assert mosquitto.alive and mosquitto.port == port and mosquitto.pid != pid
    with socket.create_connection((mosquitto.host, mosquitto.port), timeout=2):
        pass


# -- victoria-metrics --------------------------------------------------------------------------------


def _write_with_influx_client(victoria: VictoriaMetrics, lines: list[str]) -> None:
    with InfluxDBClient(url=victoria.url, token="x", org="o") as client:
        client.write_api(write_options=SYNCHRONOUS).write(bucket="b", record=lines, write_precision=WritePrecision.MS)


def test_victoria_influx_write_and_export(victoria: VictoriaMetrics) -> None:
    now_ms = int(time.time() * 1000)
    lines = [
        f"cpu,host=edge-1,site=a usage=0.5 {now_ms}",
        f"cpu,host=edge-1,site=a usage=0.75 {now_ms + 1}",
        f"cpu,host=edge-2,site=b usage=1.25,count=3i {now_ms + 2}",
    ]
    _write_with_influx_client(victoria, lines)

    series = victoria.export('{__name__=~"cpu_.*"}')

    got = {(s.name, tuple(sorted(s.labels.items()))): (s.values, s.timestamps_ms) for s in series}
    assert got == {
        ("cpu_usage", (("host", "edge-1"), ("site", "a"))): ([0.5, 0.75], [now_ms, now_ms + 1]),
        ("cpu_usage", (("host", "edge-2"), ("site", "b"))): ([1.25], [now_ms + 2]),
        ("cpu_count", (("host", "edge-2"), ("site", "b"))): ([3.0], [now_ms + 2]),
    }


def test_victoria_keeps_old_points_with_long_retention(victoria: VictoriaMetrics) -> None:
    """The default one-month retention would silently drop this point (docs/traps.md #6)."""
    ninety_days_ago_ms = int((time.time() - 90 * 86_400) * 1000)
    victoria.write_lines([f"old,k=v f=7 {ninety_days_ago_ms}"])
    [series] = victoria.export('{__name__="old_f"}')
    assert series.values == [7.0] and series.timestamps_ms == [ninety_days_ago_ms]


def test_victoria_data_survives_kill_after_persist_and_graceful_restart(victoria: VictoriaMetrics) -> None:
    now_ms = int(time.time() * 1000)
    _write_with_influx_client(victoria, [f"dur,k=kill v=1 {now_ms}"])
    victoria.persist()
    victoria.kill()
    assert not victoria.alive
    victoria.start()
    _write_with_influx_client(victoria, [f"dur,k=stop v=2 {now_ms}"])
    victoria.restart()

    got = {s.labels["k"]: s.values for s in victoria.export('{__name__="dur_v"}')}
    assert got == {"kill": [1.0], "stop": [2.0]}


def test_victoria_missing_binary_names_apt_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(VictoriaError, match="apt-get install -y victoria-metrics"):
        find_victoria_metrics()


def test_victoria_session_fixture_serves(victoria_session: VictoriaMetrics) -> None:
    now_ms = int(time.time() * 1000)
    victoria_session.write_lines([f"session_probe,t=x v=42 {now_ms}"])
    [series] = victoria_session.export('{__name__="session_probe_v"}')
    assert series.values == [42.0] and series.labels == {"t": "x"}


# -- tcp proxy ---------------------------------------------------------------------------------------


def test_proxy_forwards_mqtt_round_trip(mosquitto: Mosquitto, tcp_proxy: TcpProxyFactory, clients: MakeClient) -> None:
    proxy = tcp_proxy(mosquitto.host, mosquitto.port)
    sub = clients("sub")
    sub.connect(proxy.host, proxy.port)
    sub.subscribe("t/proxy")
    pub = clients("pub")
    pub.connect(mosquitto.host, mosquitto.port)

    pub.publish_all("t/proxy", [b"via-proxy"])

    assert [m.payload for m in sub.receive(1)] == [b"via-proxy"]
    # CONNACK 4 + SUBACK 5 + PUBLISH 22 bytes; the counter may trail the client by a moment.
    stats = proxy.wait_until(lambda s: s.bytes_down >= 31, timeout=WAIT_S)
    assert stats.bytes_down == 31
    assert stats.connections_total == 1 and stats.active_connections == 1
    assert stats.bytes_up > 0


def test_proxy_carries_large_payload_intact(
    mosquitto: Mosquitto, tcp_proxy: TcpProxyFactory, clients: MakeClient
) -> None:
    """Several MiB each way: partial sends and the back-pressure limit of the proxy are exercised."""
    proxy = tcp_proxy(mosquitto.host, mosquitto.port)
    sub = clients("sub")
    sub.connect(proxy.host, proxy.port)
    sub.subscribe("t/big")
    pub = clients("pub")
    pub.connect(proxy.host, proxy.port)
    payload = os.urandom(3 * 1024 * 1024)

    pub.publish_all("t/big", [payload])

    [message] = sub.receive(1)
    assert message.payload == payload
    assert proxy.wait_until(lambda s: s.bytes_down > len(payload), timeout=WAIT_S).bytes_up > len(payload)


def test_proxy_reset_disconnects_client_which_reconnects(
    mosquitto: Mosquitto, tcp_proxy: TcpProxyFactory, clients: MakeClient
) -> None:
    proxy = tcp_proxy(mosquitto.host, mosquitto.port)
    client = clients("flaky")
    client.connect(proxy.host, proxy.port)

    proxy.reset()

    client.wait_disconnects(1)
    client.wait_connects(2)
    assert proxy.connections_total == 2
    client.publish_all("t/after-reset", [b"ok"])


def test_proxy_blackhole_holds_publish_until_restore(
    mosquitto: Mosquitto, tcp_proxy: TcpProxyFactory, clients: MakeClient
) -> None:
    proxy = tcp_proxy(mosquitto.host, mosquitto.port)
    watcher = clients("watcher")
    watcher.connect(mosquitto.host, mosquitto.port)
    watcher.subscribe("t/hole")
    client = clients("lte")
    client.connect(proxy.host, proxy.port, keepalive=1)

    proxy.blackhole()
    info = client.client.publish("t/hole", b"late", qos=1)
    info.wait_for_publish(timeout=0.5)
    assert not info.is_published()
    client.wait_disconnects(1)  # only the keep-alive notices the dead link
    assert watcher.messages.empty()
    assert proxy.bytes_dropped > 0

    proxy.restore()

    info.wait_for_publish(timeout=WAIT_S)
    assert info.is_published()
    assert [m.payload for m in watcher.receive(1)] == [b"late"]


def test_proxy_refuse_blocks_new_connections_only(
    mosquitto: Mosquitto, tcp_proxy: TcpProxyFactory, clients: MakeClient
) -> None:
    proxy = tcp_proxy(mosquitto.host, mosquitto.port)
    existing = clients("existing")
    existing.connect(proxy.host, proxy.port)

    proxy.refuse()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((proxy.host, proxy.port), timeout=2)
    existing.publish_all("t/refuse", [b"still-up"])
    proxy.restore()
    newcomer = clients("newcomer")
    newcomer.connect(proxy.host, proxy.port)
    assert proxy.connections_total == 2


async def test_proxy_works_from_asyncio(mosquitto: Mosquitto, tcp_proxy: TcpProxyFactory) -> None:
    proxy: TcpProxy = tcp_proxy(mosquitto.host, mosquitto.port)
    async with asyncio.timeout(WAIT_S), aiomqtt.Client(proxy.host, proxy.port, identifier="aio") as client:
        await client.subscribe("t/aio", qos=1)
        await client.publish("t/aio", b"async", qos=1)
        message = await anext(aiter(client.messages))
    assert message.payload == b"async"
    assert proxy.connections_total == 1
