"""The MQTT link against a real mosquitto: delivery, outages, birth/will, sessions, protocol fallback."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devservers import Mosquitto, TcpProxy
from devservers.mqttwire import WireCounter
from edge_node.errors import ConfigError
from edge_node.uplink.link import IncomingMessage, Link, LinkConfig
from edge_node.uplink.outbox import Outbox, OutMessage, Priority
from tests.pki import TlsFiles
from tests.plugin_servers import MosquittoFactory, TcpProxyFactory
from tests.poll import wait_for_async

WAIT = 20.0
STATUS = "dev/d1/status"


@dataclass
class Got:
    topic: str
    payload: bytes
    retain: bool


@dataclass
class Sub:
    """A real paho subscriber in its own thread; persistent (3.1.1, clean_session False) if asked."""

    host: str
    port: int
    topics: list[str]
    client_id: str = "sub"
    persistent: bool = False
    got: list[Got] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    subscribed: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=not self.persistent,
            protocol=mqtt.MQTTv311,
        )
        self.client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]  # paho accepts floats
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in self.topics])
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.got.append(Got(msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.cond.notify_all()

    def start(self) -> Sub:
        self.client.connect(self.host, self.port, keepalive=10)
        self.client.loop_start()
        assert self.subscribed.wait(WAIT), "subscriber could not subscribe"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def payloads(self, topic: str | None = None) -> list[bytes]:
        with self.cond:
            return [g.payload for g in self.got if topic is None or g.topic == topic]

    def wait(self, predicate: Callable[[Sub], bool], timeout: float = WAIT) -> None:
        """Blocking: call through asyncio.to_thread from a test that runs the link on its loop."""
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self), timeout):
                raise AssertionError(f"timed out; subscriber has {len(self.got)} messages")


@contextlib.contextmanager
def subscriber(host: str, port: int, topics: list[str], **kw: Any) -> Iterator[Sub]:
    sub = Sub(host, port, topics, **kw).start()
    try:
        yield sub
    finally:
        sub.stop()


def retained(host: str, port: int, topic: str) -> bytes:
    """The retained message on `topic` now, read by a fresh subscriber."""
    with subscriber(host, port, [topic], client_id=f"peek-{time.monotonic_ns()}") as sub:
        sub.wait(lambda s: bool(s.got), 5.0)
        return sub.got[0].payload


def publish_qos1(host: str, port: int, topic: str, payload: bytes) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pub", protocol=mqtt.MQTTv311)
    client.connect(host, port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(WAIT)
    finally:
        client.disconnect()
        client.loop_stop()


def msg(i: int, prio: Priority = Priority.RESULTS, size: int = 50) -> OutMessage:
    mid = f"{prio.name}-{i:06d}"
    return OutMessage(f"dev/d1/{prio.name}", mid.encode().ljust(size, b"."), prio, mid)


def status(text: str) -> OutMessage:
    return OutMessage(STATUS, text.encode(), Priority.CONTROL, f"status-{text}", retain=True)


@dataclass
class Rig:
    """An outbox and a running link; `inbox` collects what the link's handler received."""

    outbox: Outbox
    link: Link
    task: asyncio.Task[None]
    inbox: asyncio.Queue[IncomingMessage]
    births: list[int]  # the connection number each birth was built for
    wills: list[int]  # and each last will (one per CONNECT)


@contextlib.asynccontextmanager
async def running_link(
    tmp_path: Path, host: str, port: int, *, subscriptions: Sequence[tuple[str, int]] = (), **cfg: Any
) -> AsyncIterator[Rig]:
    outbox = await Outbox.open(tmp_path / "outbox.db", 50_000_000)
    inbox: asyncio.Queue[IncomingMessage] = asyncio.Queue()
    births: list[int] = []
    wills: list[int] = []

    def birth(connection: int) -> OutMessage:
        births.append(connection)
        return status(f"online-{len(births)}")

    def will(connection: int) -> OutMessage:
        wills.append(connection)
        return status("offline-will")

    options: dict[str, Any] = {"client_id": "d1", "reconnect_min_s": 0.05, "reconnect_max_s": 0.5}
    options.update(cfg)
    link = Link(
        LinkConfig(host=host, port=port, **options),
        outbox,
        will=will,
        birth=birth,
        subscriptions=list(subscriptions),
        on_message=inbox.put,
    )
    task = asyncio.create_task(link.run())
    try:
        yield Rig(outbox, link, task, inbox, births, wills)
    finally:
        if not task.done():
            await asyncio.wait_for(link.close(drain_timeout=2.0), WAIT)
            await asyncio.wait_for(task, WAIT)
        await outbox.close()


def first_seen(payloads: list[bytes]) -> list[str]:
    seen: dict[str, None] = {}
    for p in payloads:
        seen.setdefault(p.split(b".", 1)[0].decode(), None)
    return list(seen)


async def test_every_message_arrives_exactly_once_and_outbox_empties(tmp_path: Path, mosquitto: Mosquitto) -> None:
    n = 2000
    with subscriber(mosquitto.host, mosquitto.port, ["dev/d1/+"]) as sub:
        async with running_link(tmp_path, mosquitto.host, mosquitto.port, inflight_window=64) as rig:
            await rig.outbox.put_many([msg(i, Priority(i % 5)) for i in range(n)])
            await asyncio.to_thread(sub.wait, lambda s: len(s.got) >= n + 1)  # + the birth
            await rig.link.close(drain_timeout=5.0)
            assert rig.outbox.depth == 0
            assert rig.link.stats.published == n + 1
            assert rig.link.stats.puback_failures == 0
    data = [p for p in sub.payloads() if not p.startswith(b"online")]
    assert len(data) == n and len(set(data)) == n
    for prio in Priority:
        got = first_seen(sub.payloads(f"dev/d1/{prio.name}"))
        assert got == [f"{prio.name}-{i:06d}" for i in range(n) if i % 5 == prio]


async def test_broker_outage_mid_stream_loses_nothing(tmp_path: Path, mosquitto: Mosquitto) -> None:
    n = 3000
    with subscriber(mosquitto.host, mosquitto.port, ["dev/d1/+"], client_id="sub-p", persistent=True) as sub:
        async with running_link(tmp_path, mosquitto.host, mosquitto.port, inflight_window=100) as rig:
            await rig.outbox.put_many([msg(i, Priority(i % 5)) for i in range(n // 2)])
            await asyncio.to_thread(sub.wait, lambda s: len(s.got) >= 300)
            await asyncio.to_thread(mosquitto.stop)
            await wait_for_async(lambda: not rig.link.is_connected, WAIT, "link notices the outage", interval=0.01)
            # Produced while the broker is down: accepted durably, sent after it is back.
            await rig.outbox.put_many([msg(i, Priority(i % 5)) for i in range(n // 2, n)])
            await asyncio.sleep(1.0)  # the outage itself
            await asyncio.to_thread(mosquitto.start)
            await asyncio.wait_for(rig.link.wait_connected(), WAIT)
            distinct = lambda s: len(set(s.payloads()) - {b"online-1", b"online-2"}) >= n  # noqa: E731
            await asyncio.to_thread(sub.wait, distinct)
            await rig.link.close(drain_timeout=5.0)
            assert rig.outbox.depth == 0
            assert rig.link.stats.reconnects >= 1
    assert not mosquitto.dropped_messages_logged()
    for prio in Priority:
        got = first_seen(sub.payloads(f"dev/d1/{prio.name}"))
        assert got == [f"{prio.name}-{i:06d}" for i in range(n) if i % 5 == prio]


async def test_birth_after_reconnect_and_will_after_a_killed_connection(
    tmp_path: Path, mosquitto: Mosquitto, tcp_proxy: TcpProxyFactory
) -> None:
    proxy: TcpProxy = tcp_proxy(mosquitto.host, mosquitto.port)
    host = mosquitto.host
    async with running_link(tmp_path, proxy.host, proxy.port, keepalive=5) as rig:
        await asyncio.wait_for(rig.link.wait_connected(), WAIT)
        with subscriber(host, mosquitto.port, [STATUS]) as sub:
            await asyncio.to_thread(sub.wait, lambda s: b"online-1" in s.payloads())
            await asyncio.to_thread(proxy.refuse)  # no way back in yet
            await asyncio.to_thread(proxy.reset)  # the TCP connection dies without DISCONNECT
            await asyncio.to_thread(sub.wait, lambda s: b"offline-will" in s.payloads())
            assert await asyncio.to_thread(retained, host, mosquitto.port, STATUS) == b"offline-will"
            await wait_for_async(lambda: not rig.link.is_connected, WAIT, "link notices the reset", interval=0.01)
            await asyncio.to_thread(proxy.restore)
            await asyncio.to_thread(sub.wait, lambda s: b"online-2" in s.payloads())
        assert rig.link.stats.reconnects == 1
        assert await asyncio.to_thread(retained, host, mosquitto.port, STATUS) == b"online-2"
    # Each CONNECT took the next connection number, and its will and birth carry the same one.
    first, second = rig.births
    assert second > first and rig.wills[0] == first and rig.wills[-1] == second


async def test_connection_numbers_grow_across_restarts_and_keep_up_with_the_clock(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Kept in the outbox file: a restarted node numbers its connections after the last run's,
    and never below the wall clock in ms (a new file does not start again from 0)."""
    before_ms = int(time.time() * 1000)
    numbers: list[int] = []
    for _ in range(2):
        async with running_link(tmp_path, mosquitto.host, mosquitto.port) as rig:
            await asyncio.wait_for(rig.link.wait_connected(), WAIT)
            numbers += rig.births
    assert len(numbers) == 2 and before_ms <= numbers[0] < numbers[1]
    (tmp_path / "fresh").mkdir()
    async with running_link(tmp_path / "fresh", mosquitto.host, mosquitto.port) as rig:
        await asyncio.wait_for(rig.link.wait_connected(), WAIT)
        assert rig.births[0] >= before_ms


async def test_clean_close_sends_the_shutdown_status_not_the_will(tmp_path: Path, mosquitto: Mosquitto) -> None:
    async with running_link(tmp_path, mosquitto.host, mosquitto.port) as rig:
        await asyncio.wait_for(rig.link.wait_connected(), WAIT)
        await rig.outbox.put(status("offline-shutdown"))
        await rig.link.close(drain_timeout=5.0)
        await asyncio.wait_for(rig.task, WAIT)
        assert rig.outbox.depth == 0
    assert await asyncio.to_thread(retained, mosquitto.host, mosquitto.port, STATUS) == b"offline-shutdown"


@pytest.mark.parametrize("protocol", ["mqtt5", "mqtt311"])
async def test_persistent_session_delivers_commands_sent_while_down(
    tmp_path: Path, mosquitto: Mosquitto, tcp_proxy: TcpProxyFactory, protocol: str
) -> None:
    proxy = tcp_proxy(mosquitto.host, mosquitto.port)
    subs = [("dev/d1/cmd", 1)]
    async with running_link(tmp_path, proxy.host, proxy.port, subscriptions=subs, protocol=protocol) as rig:
        await asyncio.wait_for(rig.link.wait_connected(), WAIT)
        await asyncio.to_thread(publish_qos1, mosquitto.host, mosquitto.port, "dev/d1/cmd", b"first")
        first = await asyncio.wait_for(rig.inbox.get(), WAIT)
        assert (first.payload, first.qos) == (b"first", 1)
        # The link acks `first` after its handler ran; unless that PUBACK reached the broker before
        # the cut, the persistent session rightly redelivers `first` ahead of `while-down`. A QoS 1
        # message the link publishes afterwards goes out on the same connection behind the PUBACK,
        # so once the broker acked it, it has taken the PUBACK too.
        await rig.outbox.put(status("after-first"))
        await wait_for_async(
            lambda: rig.outbox.depth == 0, WAIT, "the broker acked a message sent after the PUBACK", interval=0.01
        )
        await asyncio.to_thread(proxy.refuse)
        await asyncio.to_thread(proxy.reset)
        await wait_for_async(lambda: not rig.link.is_connected, WAIT, "link notices the reset", interval=0.01)
        await asyncio.to_thread(publish_qos1, mosquitto.host, mosquitto.port, "dev/d1/cmd", b"while-down")
        await asyncio.to_thread(proxy.restore)
        second = await asyncio.wait_for(rig.inbox.get(), WAIT)
        assert second.payload == b"while-down"
        assert rig.link.stats.protocol == protocol


async def _mqtt311_only_front(mosquitto: Mosquitto) -> tuple[asyncio.Server, int]:
    """A front end that behaves like a 3.1.1-only broker: MQTT 5 CONNECTs get CONNACK rc=1.

    Every other connection is spliced to the real mosquitto behind it.
    """

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.read(65536)  # the CONNECT fits one segment on loopback
        # Fixed header (1 B), remaining length (1 B for a short CONNECT), then "\0\4MQTT" + level.
        if len(head) > 8 and head[8] == 5:
            writer.write(b"\x20\x02\x00\x01")
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(mosquitto.host, mosquitto.port)
        up_writer.write(head)
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_auto_falls_back_to_mqtt311(tmp_path: Path, mosquitto: Mosquitto) -> None:
    server, port = await _mqtt311_only_front(mosquitto)
    async with server:
        with subscriber(mosquitto.host, mosquitto.port, ["dev/d1/+"]) as sub:
            async with running_link(tmp_path, "127.0.0.1", port, protocol="auto") as rig:
                await asyncio.wait_for(rig.link.wait_connected(), WAIT)
                assert rig.link.stats.protocol == "mqtt311"
                await rig.outbox.put(msg(1))
                await asyncio.to_thread(sub.wait, lambda s: len(s.got) >= 2)
        server.close()
    assert rig.link.stats.connect_failures == 0


async def test_closed_before_connack_keeps_mqtt5_and_backs_off(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, tcp_proxy: TcpProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway whose upstream is down accepts TCP, then resets before any CONNACK: that is an
    outage, not a broker refusing MQTT 5, so `auto` must not downgrade and must keep its backoff."""
    broker = mosquitto_factory(start=False)  # the upstream: its port is known, nothing listens yet
    proxy = tcp_proxy(broker.host, broker.port)
    attempts, min_s = 4, 0.3
    caplog.set_level(logging.WARNING, logger="edge_node.uplink.link")
    async with running_link(tmp_path, proxy.host, proxy.port, protocol="auto", reconnect_min_s=min_s) as rig:
        await wait_for_async(
            lambda: rig.link.stats.connect_failures >= attempts, WAIT, "failed attempts", interval=0.01
        )
        # The proxy accepted each attempt (reset before CONNACK), it did not refuse the TCP connect.
        assert proxy.connections_total >= attempts
        error = rig.link.stats.last_error or ""
        assert error.startswith(("closed:", "network:")), error
        assert not rig.link.is_connected
        await asyncio.to_thread(broker.start)
        await asyncio.wait_for(rig.link.wait_connected(), WAIT)
        assert rig.link.stats.protocol == "mqtt5"
    records = [r for r in caplog.records if r.name == "edge_node.uplink.link"]
    assert not [r.getMessage() for r in records if "falling back" in r.getMessage()]
    # Each failure is logged just before its backoff sleep starts: consecutive failures are at
    # least reconnect_min_s apart (full jitter draws from [min, cap]); a load spike only widens them.
    failed = [r.created for r in records if r.getMessage().startswith("mqtt connect failed")]
    gaps = [b - a for a, b in itertools.pairwise(failed)]
    assert len(gaps) >= attempts - 1 and min(gaps) >= min_s, gaps


async def test_auto_uses_mqtt5_when_the_broker_speaks_it(tmp_path: Path, mosquitto: Mosquitto) -> None:
    async with running_link(tmp_path, mosquitto.host, mosquitto.port, protocol="auto") as rig:
        await asyncio.wait_for(rig.link.wait_connected(), WAIT)
        assert rig.link.stats.protocol == "mqtt5"


async def test_puback_failure_is_counted_and_not_retried(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite dev/d1/#\n")
    broker = mosquitto_factory(extra_conf=f"acl_file {acl}")
    with subscriber(broker.host, broker.port, ["dev/d1/+"]) as sub:
        async with running_link(tmp_path, broker.host, broker.port, protocol="mqtt5") as rig:
            await rig.outbox.put(OutMessage("forbidden/x", b"no", Priority.RESULTS, "denied-1"))
            await rig.outbox.put(msg(1))
            await asyncio.to_thread(sub.wait, lambda s: any(p.startswith(b"RESULTS") for p in s.payloads()))
            await rig.link.close(drain_timeout=5.0)
            assert rig.link.stats.puback_failures == 1
            assert rig.outbox.depth == 0  # the rejected row is not retried forever


async def test_auth_failure_holds_off_and_refused_retries_fast(
    tmp_path: Path, mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory(allow_anonymous=False)
    async with running_link(tmp_path / "a", broker.host, broker.port, reconnect_max_s=30.0) as rig:
        await wait_for_async(lambda: rig.link.stats.connect_failures >= 1, WAIT, "an auth failure", interval=0.01)
        assert (rig.link.stats.last_error or "").startswith("auth:")
        await asyncio.sleep(0.5)  # long enough for several fast retries, were it retrying hot
        assert rig.link.stats.connect_failures == 1
    closed_port = broker.port
    await asyncio.to_thread(broker.stop)
    async with running_link(tmp_path / "b", "127.0.0.1", closed_port, reconnect_max_s=0.1) as rig:
        await wait_for_async(lambda: rig.link.stats.connect_failures >= 3, WAIT, "fast retries", interval=0.01)
        assert (rig.link.stats.last_error or "").startswith("refused:")


async def test_dns_failure_is_reported_as_dns(tmp_path: Path) -> None:
    async with running_link(tmp_path, "no-such-broker.invalid", 1883) as rig:
        await wait_for_async(lambda: rig.link.stats.connect_failures >= 1, WAIT, "a DNS failure", interval=0.01)
        assert (rig.link.stats.last_error or "").startswith("dns:")


async def test_blackholed_link_is_detected_by_keepalive_and_recovers(
    tmp_path: Path, mosquitto: Mosquitto, tcp_proxy: TcpProxyFactory
) -> None:
    proxy = tcp_proxy(mosquitto.host, mosquitto.port)
    with subscriber(mosquitto.host, mosquitto.port, ["dev/d1/+"], client_id="sub-p", persistent=True) as sub:
        async with running_link(tmp_path, proxy.host, proxy.port, keepalive=1) as rig:
            await asyncio.wait_for(rig.link.wait_connected(), WAIT)
            await asyncio.to_thread(proxy.blackhole)
            await rig.outbox.put_many([msg(i) for i in range(50)])  # sent into the void, unacked
            await wait_for_async(lambda: not rig.link.is_connected, 10, "keep-alive timeout", interval=0.01)
            await asyncio.to_thread(proxy.restore)
            await asyncio.to_thread(sub.wait, lambda s: len(set(s.payloads()) - {b"online-1", b"online-2"}) >= 50)
            assert rig.link.stats.reconnects >= 1


async def test_tls_connects_with_the_right_ca_and_reports_tls_errors(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, tls: TlsFiles
) -> None:
    broker = mosquitto_factory(start=False)
    tls_port = broker.add_listener(lines=tls.listener_lines())
    await asyncio.to_thread(broker.start)
    async with running_link(tmp_path / "good", "127.0.0.1", tls_port, tls_ca=tls.ca.cert) as rig:
        await asyncio.wait_for(rig.link.wait_connected(), WAIT)
        await rig.outbox.put(msg(1))
        await wait_for_async(
            lambda: rig.link.stats.published == 2, WAIT, "birth and message PUBACKed over TLS", interval=0.01
        )
        assert rig.link.stats.window == 100  # the broker's Receive Maximum (max_inflight_messages)
    async with running_link(tmp_path / "bad", "127.0.0.1", tls_port, tls_ca=tls.other_ca.cert) as rig:
        await wait_for_async(lambda: rig.link.stats.connect_failures >= 1, WAIT, "a TLS failure", interval=0.01)
        assert (rig.link.stats.last_error or "").startswith("tls:")
        assert not rig.link.is_connected


@pytest.mark.parametrize("setting", ["tls_ca", "tls_cert"])
async def test_a_bad_tls_file_is_a_config_error_when_the_link_is_made(tmp_path: Path, setting: str) -> None:
    """Read once, up front: a clear error naming the file, not a traceback at every reconnect."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not PEM\n")
    outbox = await Outbox.open(tmp_path / "outbox.db", 1_000_000)
    try:
        with pytest.raises(ConfigError, match=rf"\[mqtt\] {setting} {re.escape(str(bad))}.*; fix: "):
            Link(
                LinkConfig(host="127.0.0.1", client_id="d1", **{setting: bad}),
                outbox,
                will=lambda n: status("offline"),
                birth=lambda n: status("online"),
                subscriptions=[],
                on_message=lambda m: None,
            )
    finally:
        await outbox.close()


async def test_close_while_the_broker_is_down_returns_promptly(tmp_path: Path, mosquitto: Mosquitto) -> None:
    async with running_link(tmp_path, mosquitto.host, mosquitto.port) as rig:
        await asyncio.wait_for(rig.link.wait_connected(), WAIT)
        await asyncio.to_thread(mosquitto.stop)
        await wait_for_async(lambda: rig.link.stats.connect_failures >= 1, WAIT, "reconnect attempts", interval=0.01)
        await rig.outbox.put(msg(1))
        started = time.monotonic()
        await asyncio.wait_for(rig.link.close(drain_timeout=5.0), WAIT)
        await asyncio.wait_for(rig.task, WAIT)
        assert time.monotonic() - started < 2.0  # nothing to drain without a connection
        assert rig.outbox.depth == 1  # kept for the next run


async def test_link_stops_when_its_outbox_is_closed_under_it(tmp_path: Path, mosquitto: Mosquitto) -> None:
    async with running_link(tmp_path, mosquitto.host, mosquitto.port) as rig:
        await asyncio.wait_for(rig.link.wait_connected(), WAIT)
        await wait_for_async(lambda: rig.link.stats.published == 1, WAIT, "the birth PUBACKed", interval=0.01)
        assert await asyncio.to_thread(retained, mosquitto.host, mosquitto.port, STATUS) == b"online-1"
        await rig.outbox.close()
        await asyncio.wait_for(rig.task, WAIT)  # run() ends instead of reconnecting in a loop
        assert rig.link.stats.reconnects == 0
    assert await asyncio.to_thread(retained, mosquitto.host, mosquitto.port, STATUS) == b"offline-will"


@pytest.mark.parametrize("protocol", ["mqtt5", "mqtt311"])
async def test_topic_aliases_name_a_topic_once_per_connection(
    tmp_path: Path, mosquitto: Mosquitto, protocol: str
) -> None:
    """MQTT 5: the first publish on a topic carries its name and an alias, later ones the alias
    alone. Aliases die with the connection: after a reset the names go again, and nothing is lost
    (a PUBLISH with an alias the new connection never set would make the broker disconnect)."""
    counter = WireCounter()
    with TcpProxy(mosquitto.host, mosquitto.port, tap=counter.feed) as proxy:
        topics = [f"dev/d1/{p.name}" for p in (Priority.RESULTS, Priority.SAMPLES)]
        with subscriber(mosquitto.host, mosquitto.port, topics) as sub:
            async with running_link(tmp_path, proxy.host, proxy.port, protocol=protocol) as rig:
                await rig.outbox.put_many([msg(i, (Priority.RESULTS, Priority.SAMPLES)[i % 2]) for i in range(20)])
                await asyncio.to_thread(sub.wait, lambda s: len(s.got) >= 20)
                await wait_for_async(lambda: rig.outbox.depth, WAIT, "the PUBACKs of all 20", until=lambda n: n == 0)
                first = counter.aliased["up"]
                connects = proxy.stats().connections_total
                proxy.reset()
                await asyncio.to_thread(proxy.wait_until, lambda s: s.connections_total > connects, WAIT)
                await rig.outbox.put_many([msg(i, (Priority.RESULTS, Priority.SAMPLES)[i % 2]) for i in range(20, 40)])
                await asyncio.to_thread(sub.wait, lambda s: len(set(s.payloads())) >= 40)
                await rig.link.close(drain_timeout=5.0)
                assert rig.outbox.depth == 0
    for prio in (Priority.RESULTS, Priority.SAMPLES):
        got = first_seen(sub.payloads(f"dev/d1/{prio.name}"))
        assert got == [f"{prio.name}-{i:06d}" for i in range(40) if i % 2 == (prio == Priority.SAMPLES)]
    if protocol == "mqtt311":
        assert counter.aliased["up"] == 0
    else:
        # 20 publishes on two topics: 2 name their topic, 18 use the alias; the same after the reset.
        assert first == 18
        assert counter.aliased["up"] == 36
