"""The edge node's one MQTT connection: uplink from the durable outbox, downlink to a handler.

Why paho-mqtt 2.x driven directly from the asyncio event loop rather than aiomqtt:

* Throughput of the durable path (docs/traps.md #3). aiomqtt's `publish()` awaits each PUBACK through a
  future per message on top of paho (≈ 110 µs CPU per publish, 17–19k msg/s even with a window);
  the target is ≥ 0.5× a bare paho QoS 1 publisher *including* the outbox's SQLite work. Driving
  paho ourselves costs paho's own ≈ 32 µs per publish and nothing more: a PUBACK is one `on_publish`
  callback that appends the row id to a list acked to the outbox once per loop iteration.
* Control. We need the PUBACK reason code (a failure counts as rejected, not retried forever), the
  broker's Receive Maximum from CONNACK, MQTT 5 → 3.1.1 fallback on "unsupported protocol version",
  manual acks of incoming QoS 1 messages (acked only after the handler ran, so a crash before that
  gets the command redelivered by the persistent session), and distinct DNS / refused / TLS / auth
  errors. aiomqtt hides or re-wraps most of these.

Event-loop integration: paho's socket callbacks add/remove the socket to the loop's reader/writer
sets (`loop_read` / `loop_write`), and a 1 s timer calls `loop_misc` for keep-alive, so nothing blocks
the loop. paho's `connect()` does DNS, the TCP connect and the TLS handshake synchronously: it runs in
a worker thread before the client is registered with the loop (nothing else touches that client then).
A fresh paho client is made per connection attempt, so paho never re-sends anything on its own: the
outbox is the only source of (re)transmissions, and rows in flight at a disconnect are released back
to it and sent again (at-least-once; the `msg_id` identifies duplicates downstream).

Everything goes through the outbox; there is deliberately no direct publish.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import math
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_node.errors import ConnectFailure, OutboxClosedError, OutboxError
from edge_node.uplink.outbox import Outbox, OutMessage, Priority, Stored

log = logging.getLogger(__name__)
# The outbox sequence that numbers the device's connections (status `connection`).
CONNECTION_SEQUENCE = "connection"

Protocol = Literal["mqtt5", "mqtt311", "auto"]
MessageHandler = Callable[["IncomingMessage"], Awaitable[None] | None]

_MISC_INTERVAL_S = 1.0
# CONNACK reason codes (MQTT 5 values; paho maps 3.1.1 return codes onto them).
_RC_UNSUPPORTED_PROTOCOL = 132
_RC_AUTH = frozenset({134, 135})  # bad user name or password, not authorized
_DISCONNECT_WAIT_S = 2.0


@dataclass
class LinkConfig:
    """Where and how to connect. `session_expiry_s` > 0 asks for a persistent session."""

    host: str
    port: int = 1883
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive: int = 30
    protocol: Protocol = "auto"
    session_expiry_s: int = 7 * 24 * 3600
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    inflight_window: int = 256
    connect_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.protocol not in ("mqtt5", "mqtt311", "auto"):
            raise ValueError(f"protocol must be mqtt5, mqtt311 or auto, got {self.protocol!r}")
        if self.inflight_window < 1:
            raise ValueError(f"inflight_window must be >= 1, got {self.inflight_window}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        if self.persistent and not self.client_id:
            raise ValueError("a persistent session (session_expiry_s > 0) needs a fixed client_id")

    @property
    def persistent(self) -> bool:
        return self.session_expiry_s > 0


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """A message received from the broker (commands, escalation replies, inputs)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    message_expiry: int | None = None


@dataclass
class LinkStats:
    """Counters since the Link was made. `last_error` is the latest connection problem, if any."""

    published: int = 0
    puback_failures: int = 0
    connects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    received: int = 0
    handler_errors: int = 0
    last_error: str | None = None
    protocol: str | None = None
    window: int = 0


def _classify(err: BaseException) -> ConnectFailure:
    if isinstance(err, socket.gaierror):
        return ConnectFailure("dns", f"cannot resolve host ({err})")
    if isinstance(err, ConnectionRefusedError):
        return ConnectFailure("refused", f"connection refused ({err})")
    if isinstance(err, ssl.SSLError | ssl.CertificateError):
        return ConnectFailure("tls", f"TLS handshake failed ({err})")
    if isinstance(err, TimeoutError | socket.timeout):
        return ConnectFailure("timeout", f"connect timed out ({err})")
    return ConnectFailure("network", f"{type(err).__name__}: {err}")


def _connack_failure(rc: ReasonCode) -> ConnectFailure:
    if rc.value in _RC_AUTH:
        return ConnectFailure("auth", f"broker refused the credentials: {rc} ({rc.value})")
    if rc.value == _RC_UNSUPPORTED_PROTOCOL:
        return ConnectFailure("protocol", f"broker refused the protocol version: {rc} ({rc.value})")
    return ConnectFailure("broker", f"broker refused the connection: {rc} ({rc.value})")


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves __init__ unannotated


def _publish_properties(msg: OutMessage, now: float) -> Properties | None:
    """MQTT 5 PUBLISH properties, or None when the message needs none (the common, cheap case)."""
    if not (
        msg.expires_at is not None
        or msg.user_properties
        or msg.response_topic
        or msg.correlation_data is not None
        or msg.content_type
    ):
        return None
    props = _properties(PacketTypes.PUBLISH)
    if msg.expires_at is not None:
        props.MessageExpiryInterval = max(1, math.ceil(msg.expires_at - now))
    if msg.user_properties:
        props.UserProperty = list(msg.user_properties)
    if msg.response_topic:
        props.ResponseTopic = msg.response_topic
    if msg.correlation_data is not None:
        props.CorrelationData = msg.correlation_data
    if msg.content_type:
        props.ContentType = msg.content_type
    return props


def _incoming(message: mqtt.MQTTMessage) -> IncomingMessage:
    props = message.properties
    user = getattr(props, "UserProperty", None) or []
    return IncomingMessage(
        topic=message.topic,
        payload=bytes(message.payload),
        qos=message.qos,
        retain=bool(message.retain),
        response_topic=getattr(props, "ResponseTopic", None),
        correlation_data=getattr(props, "CorrelationData", None),
        user_properties=tuple((str(k), str(v)) for k, v in user),
        message_expiry=getattr(props, "MessageExpiryInterval", None),
    )


@dataclass(slots=True)
class _Sent:
    row_id: int
    msg_id: str
    topic: str


@dataclass
class _ConnAck:
    reason: ReasonCode
    session_present: bool
    properties: Properties | None


class _Connection:
    """One paho client bound to the event loop for the lifetime of one TCP connection."""

    def __init__(self, link: Link, protocol: MQTTProtocolVersion) -> None:
        self.link = link
        self.loop = asyncio.get_running_loop()
        self.protocol = protocol
        cfg = link.config
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            clean_session=None if protocol == MQTTProtocolVersion.MQTTv5 else not cfg.persistent,
            protocol=protocol,
            reconnect_on_failure=False,
            manual_ack=True,
        )
        self.client.connect_timeout = cfg.connect_timeout_s
        self.client.max_queued_messages_set(0)
        # Our window is the only gate: paho's own limit cannot follow the broker's Receive Maximum
        # (it is frozen once connected), and a second queue inside paho would hide rows from us.
        self.client.max_inflight_messages_set(0)
        self.connack: asyncio.Future[_ConnAck] = self.loop.create_future()
        self.closed = asyncio.Event()
        self.disconnect_reason: str = ""
        self.sent: dict[int, _Sent] = {}
        self.window = cfg.inflight_window
        self.window_open = asyncio.Event()
        self.window_open.set()
        self.all_acked = asyncio.Event()
        self.all_acked.set()
        self._acked: list[int] = []
        self._flush_scheduled = False
        self._sock: socket.socket | None = None
        self._misc: asyncio.TimerHandle | None = None
        self._configure()

    @property
    def v5(self) -> bool:
        return self.protocol == MQTTProtocolVersion.MQTTv5

    def _configure(self) -> None:
        cfg = self.link.config
        client = self.client
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls_ca is not None or cfg.tls_cert is not None:
            client.tls_set(
                ca_certs=None if cfg.tls_ca is None else str(cfg.tls_ca),
                certfile=None if cfg.tls_cert is None else str(cfg.tls_cert),
                keyfile=None if cfg.tls_key is None else str(cfg.tls_key),
            )
        will = self.link.will(self.link.connection)
        client.will_set(
            will.topic,
            will.payload,
            qos=will.qos,
            retain=will.retain,
            properties=_publish_properties(will, time.time()) if self.v5 else None,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe

    # ---- connecting ------------------------------------------------------------------------

    async def open(self) -> _ConnAck:
        """TCP (+TLS) connect in a thread, then wait for the CONNACK on the loop."""
        cfg = self.link.config
        kwargs: dict[str, Any] = {}
        if self.v5:
            props = _properties(PacketTypes.CONNECT)
            if cfg.persistent:
                props.SessionExpiryInterval = cfg.session_expiry_s
            kwargs = {"clean_start": not cfg.persistent, "properties": props}
        try:
            await asyncio.to_thread(self.client.connect, cfg.host, cfg.port, cfg.keepalive, **kwargs)
        except (OSError, ssl.CertificateError) as err:
            raise _classify(err) from err
        self._attach()
        closed = asyncio.ensure_future(self.closed.wait())
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                waiting: set[asyncio.Future[Any]] = {self.connack, closed}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError as err:
            raise ConnectFailure("timeout", f"no CONNACK within {cfg.connect_timeout_s} s") from err
        finally:
            closed.cancel()
        if not self.connack.done():
            # Closed before any CONNACK: a proxy or gateway whose upstream is down, a broker
            # restarting, or a non-conforming 3.1.1-only broker that drops MQTT 5 CONNECTs silently.
            raise ConnectFailure(
                "closed",
                f"connection closed before CONNACK ({self.disconnect_reason}); retried with backoff."
                " If this broker only speaks MQTT 3.1.1 and closes MQTT 5 connections without a"
                ' CONNACK, set [mqtt] protocol = "mqtt311"',
            )
        ack = self.connack.result()
        if ack.reason.is_failure:
            raise _connack_failure(ack.reason)
        receive_max = getattr(ack.properties, "ReceiveMaximum", None) if ack.properties else None
        if receive_max:
            self.window = min(self.window, int(receive_max))
        return ack

    def _attach(self) -> None:
        sock = self.client.socket()
        if not isinstance(sock, socket.socket):
            raise ConnectFailure("network", "paho returned no socket after connect")
        self._sock = sock
        client = self.client
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self.loop.add_reader(sock, self._readable)
        if client.want_write():
            self.loop.add_writer(sock, self._writable)
        self._misc = self.loop.call_later(_MISC_INTERVAL_S, self._tick)

    def _readable(self) -> None:
        rc = self.client.loop_read()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.debug("mqtt loop_read rc=%s", rc)
        sock = self._sock
        # TLS may hold decrypted bytes that the file descriptor will never signal again.
        if isinstance(sock, ssl.SSLSocket) and not self.closed.is_set() and sock.pending() > 0:
            self.loop.call_soon(self._readable)

    def _writable(self) -> None:
        self.client.loop_write()

    def _tick(self) -> None:
        if self.closed.is_set():
            return
        self.client.loop_misc()
        self._misc = self.loop.call_later(_MISC_INTERVAL_S, self._tick)

    # After abort() the socket is closed under paho's feet: its fd is -1 and the loop must not be
    # asked about it again.

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if not self.closed.is_set() and sock.fileno() >= 0:
            self.loop.add_writer(sock, self._writable)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if sock.fileno() >= 0:
            self.loop.remove_writer(sock)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if sock.fileno() >= 0:
            self.loop.remove_reader(sock)
            self.loop.remove_writer(sock)
        self._mark_closed("socket closed")

    def _mark_closed(self, reason: str) -> None:
        if not self.disconnect_reason:
            self.disconnect_reason = reason
        self.closed.set()
        self.window_open.set()  # wake the drain loop so it notices
        if self._misc is not None:
            self._misc.cancel()

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT (the broker will publish the will)."""
        sock = self._sock
        if sock is not None and not self.closed.is_set():
            self.loop.remove_reader(sock)
            self.loop.remove_writer(sock)
            sock.close()
        self._mark_closed("aborted")

    # ---- paho callbacks (all on the loop thread) -------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not self.connack.done():
            self.connack.set_result(_ConnAck(reason, bool(flags.session_present), properties))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._mark_closed(f"{reason} ({reason.value})")

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error("mqtt subscribe refused client_id=%s reasons=%s", self.link.config.client_id, failed)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        sent = self.sent.pop(mid, None)
        if sent is None:
            return
        stats = self.link.stats
        if reason.is_failure:
            stats.puback_failures += 1
            log.warning(
                "mqtt publish rejected by broker topic=%s msg_id=%s reason=%s code=%d",
                sent.topic,
                sent.msg_id,
                reason,
                reason.value,
            )
        else:
            stats.published += 1
        # Rejected rows are acked too: the broker's answer will not change on a retry.
        self._acked.append(sent.row_id)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush_acks)
        if len(self.sent) < self.window:
            self.window_open.set()
        if not self.sent:
            self.all_acked.set()

    def flush_acks(self) -> None:
        """Hand the PUBACKed rows of this loop iteration to the outbox in one batch."""
        self._flush_scheduled = False
        if not self._acked:
            return
        acked, self._acked = self._acked, []
        try:
            self.link.outbox.ack(acked)
        except OutboxError as err:
            log.error("outbox ack failed rows=%d error=%s", len(acked), err)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.link.stats.received += 1
        incoming = _incoming(message)
        mid, qos = message.mid, message.qos
        try:
            result = self.link.on_message(incoming)
        except Exception:
            self.link.stats.handler_errors += 1
            log.exception("message handler failed topic=%s", incoming.topic)
            result = None
        if inspect.isawaitable(result):
            self.link.track(self._finish_handler(result, mid, qos, incoming.topic))
        else:
            self._ack_incoming(mid, qos)

    async def _finish_handler(self, result: Awaitable[None], mid: int, qos: int, topic: str) -> None:
        try:
            await result
        except Exception:
            # A poison message is acked anyway: a redelivery would fail the same way, forever.
            self.link.stats.handler_errors += 1
            log.exception("message handler failed topic=%s", topic)
        self._ack_incoming(mid, qos)

    def _ack_incoming(self, mid: int, qos: int) -> None:
        if qos > 0 and not self.closed.is_set():
            # Acks after a reconnect would name a packet id of the old connection: the persistent
            # session redelivers that message instead.
            self.client.ack(mid, qos)

    # ---- publishing ------------------------------------------------------------------------

    def publish(self, row: Stored, now: float) -> bool:
        """Send one outbox row; False if paho refused it (the connection is gone)."""
        msg = row.msg
        props = _publish_properties(msg, now) if self.v5 else None
        info = self.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain, properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.debug("mqtt publish refused rc=%s topic=%s", info.rc, msg.topic)
            return False
        self.sent[info.mid] = _Sent(row.row_id, msg.msg_id, msg.topic)
        self.all_acked.clear()
        if len(self.sent) >= self.window:
            self.window_open.clear()
        return True

    def subscribe(self, subscriptions: list[tuple[str, int]]) -> None:
        if not subscriptions:
            return
        if self.v5:
            self.client.subscribe([(t, SubscribeOptions(qos=q)) for t, q in subscriptions])
        else:
            self.client.subscribe(subscriptions)

    def unsubscribe(self, topics: list[str]) -> None:
        if topics:
            self.client.unsubscribe(topics)

    def disconnect(self) -> None:
        """Clean DISCONNECT (reason 0): the broker discards the will."""
        self.client.disconnect()


@dataclass
class _Backoff:
    minimum: float
    maximum: float
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self, *, hold_off: bool = False) -> float:
        """Exponential backoff with full jitter; `hold_off` (auth failures) waits the maximum."""
        if hold_off:
            return self.maximum
        cap = min(self.maximum, self.minimum * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return self.rng.uniform(self.minimum, cap) if cap > self.minimum else self.minimum

    def reset(self) -> None:
        self.attempt = 0


class Link:
    """The device's MQTT connection: drains the outbox with a bounded window, receives messages.

    `run()` until cancelled or `close()`d. Not thread-safe: use from one event loop.
    """

    def __init__(
        self,
        config: LinkConfig,
        outbox: Outbox,
        *,
        will: Callable[[int], OutMessage],
        birth: Callable[[int], OutMessage],
        subscriptions: list[tuple[str, int]],
        on_message: MessageHandler,
    ) -> None:
        self.config = config
        self.outbox = outbox
        # The last will and the birth of connection number n (`connection`): each CONNECT gets a
        # fresh will, so that every connection's has its own msg_id (a reused one would be dropped
        # downstream as a duplicate) and its number.
        self.will = will
        self.birth = birth
        # The number of the current (or last) connection: it grows with every CONNECT, also across
        # restarts (kept in the outbox file, CONNECTION_SEQUENCE), and never falls behind the
        # wall clock in ms, so a lost outbox file does not restart it below what consumers saw.
        self.connection = 0
        self.subscriptions = list(subscriptions)
        self.on_message = on_message
        self.stats = LinkStats()
        self.connected = asyncio.Event()
        self._closing = asyncio.Event()
        self._stopped = asyncio.Event()
        self._running = False
        self._outbox_closed = False
        self._conn: _Connection | None = None
        self._backoff = _Backoff(config.reconnect_min_s, config.reconnect_max_s)
        self._protocol: MQTTProtocolVersion | None = {
            "mqtt5": MQTTProtocolVersion.MQTTv5,
            "mqtt311": MQTTProtocolVersion.MQTTv311,
            "auto": None,
        }[config.protocol]
        self._tasks: set[asyncio.Task[None]] = set()
        self._stale_subscriptions: list[str] = []

    # ---- state -----------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self.connected.is_set()

    async def wait_connected(self) -> None:
        """Wait until connected (bound it with `asyncio.timeout` at the call site)."""
        await self.connected.wait()

    def track(self, coro: Awaitable[None]) -> None:
        """Run a handler coroutine to completion without losing the task reference."""
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def add_subscription(self, topic: str, qos: int = 1) -> None:
        """Subscribe now (if connected) and on every later connect (e.g. a model's chunk topic)."""
        if (topic, qos) in self.subscriptions:
            return
        self.subscriptions.append((topic, qos))
        if self._conn is not None and not self._conn.closed.is_set():
            self._conn.subscribe([(topic, qos)])

    def remove_subscription(self, topic: str) -> None:
        """Unsubscribe now (if connected) and stop subscribing on later connects."""
        self.subscriptions = [(t, q) for t, q in self.subscriptions if t != topic]
        if self._conn is not None and not self._conn.closed.is_set():
            self._conn.unsubscribe([topic])
        else:
            # A persistent session keeps the subscription at the broker: drop it on the next connect.
            self._stale_subscriptions.append(topic)

    def drop_connection(self) -> None:
        """Cut the TCP connection without DISCONNECT, as a dead link would (the will fires)."""
        if self._conn is not None:
            self._conn.abort()

    # ---- main loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, drain, reconnect with backoff; returns after `close()`, or raises CancelledError."""
        if self._running:
            raise RuntimeError("Link.run() is already running")
        self._running = True
        self._stopped.clear()
        try:
            while not self._closing.is_set() and not self._outbox_closed:
                try:
                    conn = await self._connect_once()
                    if conn is not None:
                        await self._serve(conn)
                except Exception as err:
                    # A bug must not silently end the uplink: log it loudly, drop the connection
                    # (rows go back to the outbox) and go round again after a backoff.
                    log.exception("link connection failed unexpectedly host=%s", self.config.host)
                    self._teardown()
                    await self._after_failure(ConnectFailure("internal", repr(err)))
        finally:
            if not self._closing.is_set():
                # Cancelled: drop the connection like a crash would (the will fires).
                self._teardown()
            self._running = False
            self._stopped.set()

    async def _connect_once(self) -> _Connection | None:
        protocol = self._protocol or MQTTProtocolVersion.MQTTv5
        self.connection = await self._next_connection()
        conn = _Connection(self, protocol)
        self._conn = conn
        try:
            ack = await conn.open()
        except ConnectFailure as failure:
            conn.abort()
            self._conn = None
            if self._fallback(failure, protocol):
                return None
            await self._after_failure(failure)
            return None
        await self._on_connected(conn, ack)
        return conn

    async def _next_connection(self) -> int:
        now_ms = int(time.time() * 1000)
        try:
            return await self.outbox.next_sequence(CONNECTION_SEQUENCE, at_least=now_ms)
        except OutboxError as err:
            # A full or failing disk must not keep the device off the broker: number this
            # connection in memory (after the last one and the clock), unpersisted.
            log.warning("connection number not stored, counted in memory: %s", err)
            return max(self.connection + 1, now_ms)

    def _fallback(self, failure: ConnectFailure, protocol: MQTTProtocolVersion) -> bool:
        """protocol=auto: an MQTT 5 CONNECT refused as a protocol error → use 3.1.1 from now on."""
        if self.config.protocol != "auto" or protocol != MQTTProtocolVersion.MQTTv5:
            return False
        # Only an explicit refusal (CONNACK 0x01 under 3.1.1 framing, which paho reports as 0x84,
        # or 0x84 itself) proves the broker lacks MQTT 5. A connection closed before any CONNACK is
        # what a TCP proxy or a gateway with its upstream down does too: downgrading on that would
        # stick to 3.1.1 for the rest of the process and skip the backoff.
        if failure.kind != "protocol":
            return False
        log.warning(
            "mqtt broker refused MQTT 5, falling back to 3.1.1 host=%s port=%d detail=%s",
            self.config.host,
            self.config.port,
            failure.detail,
        )
        self._protocol = MQTTProtocolVersion.MQTTv311
        return True

    async def _after_failure(self, failure: ConnectFailure) -> None:
        self.stats.connect_failures += 1
        self.stats.last_error = str(failure)
        delay = self._backoff.next_delay(hold_off=failure.kind == "auth")
        log.warning(
            "mqtt connect failed kind=%s host=%s port=%d client_id=%s retry_in_s=%.2f detail=%s",
            failure.kind,
            self.config.host,
            self.config.port,
            self.config.client_id,
            delay,
            failure.detail,
        )
        await self._wait_closing(delay)

    async def _wait_closing(self, delay: float) -> None:
        # A backoff that close() can interrupt.
        try:
            async with asyncio.timeout(delay):
                await self._closing.wait()
        except TimeoutError:
            return

    async def _on_connected(self, conn: _Connection, ack: _ConnAck) -> None:
        if self.stats.connects:
            self.stats.reconnects += 1
        self.stats.connects += 1
        self.stats.protocol = "mqtt5" if conn.v5 else "mqtt311"
        self.stats.window = conn.window
        self._backoff.reset()
        conn.subscribe(self.subscriptions)
        stale, self._stale_subscriptions = self._stale_subscriptions, []
        conn.unsubscribe([t for t in stale if t not in {s for s, _ in self.subscriptions}])
        log.info(
            "mqtt connected host=%s port=%d client_id=%s protocol=%s session_present=%s window=%d",
            self.config.host,
            self.config.port,
            self.config.client_id,
            self.stats.protocol,
            ack.session_present,
            conn.window,
        )
        birth = dataclasses.replace(self.birth(self.connection), retain=True, priority=Priority.CONTROL)
        try:
            await self.outbox.put(birth)
        except OutboxError as err:
            log.error("birth message not queued topic=%s error=%s", birth.topic, err)
        self.connected.set()

    async def _serve(self, conn: _Connection) -> None:
        drain = asyncio.create_task(self._drain(conn), name="link-drain")
        waiters = {
            asyncio.ensure_future(self._closing.wait()),
            asyncio.ensure_future(conn.closed.wait()),
        }
        try:
            await asyncio.wait({drain, *waiters}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            drain.cancel()
            results = await asyncio.gather(drain, return_exceptions=True)
            if isinstance(results[0], Exception):
                log.error("link drain stopped error=%r", results[0])
        if self._closing.is_set() and not conn.closed.is_set():
            return  # close() drains and disconnects this connection
        self._lost(conn)

    def _lost(self, conn: _Connection) -> None:
        conn.abort()
        conn.flush_acks()
        released = self.outbox.release_inflight()
        self.connected.clear()
        self._conn = None
        self.stats.last_error = f"disconnected: {conn.disconnect_reason}"
        log.warning(
            "mqtt disconnected host=%s port=%d reason=%s released_rows=%d",
            self.config.host,
            self.config.port,
            conn.disconnect_reason,
            released,
        )

    async def _drain(self, conn: _Connection) -> None:
        """Publish outbox rows while the connection lives, at most `conn.window` unacked."""
        while not conn.closed.is_set():
            await conn.window_open.wait()
            free = conn.window - len(conn.sent)
            if free <= 0:
                conn.window_open.clear()
                continue
            try:
                rows = await self.outbox.take(free)
            except OutboxClosedError:
                # Closing the outbox under a running link is a shutdown without close(): stop,
                # and let the will announce it.
                log.error("outbox closed while the link runs: the link stops")
                self._outbox_closed = True
                return
            now = time.time()
            for row in rows:
                if conn.closed.is_set() or not conn.publish(row, now):
                    return  # rows not sent stay in flight until _lost() releases them

    # ---- shutdown --------------------------------------------------------------------------

    async def close(self, drain_timeout: float = 5.0, *, drain: Priority = Priority.SAMPLES) -> None:
        """Stop waiting for new rows, send what is pending up to priority `drain` within
        `drain_timeout` (at least the CONTROL rows, e.g. the "offline/shutdown" status the caller
        put just before), wait for their PUBACKs, then DISCONNECT cleanly (so no will is sent).
        Whatever is still unacked at the deadline stays in the outbox for the next run.
        """
        self._closing.set()
        if self._running:
            await self._stopped.wait()  # run() leaves _serve; the connection is still up
        conn = self._conn
        if conn is None or conn.closed.is_set():
            self._teardown()
            return
        try:
            async with asyncio.timeout(drain_timeout):
                await self._flush_pending(conn, drain)
                await conn.all_acked.wait()
        except TimeoutError:
            log.warning("link close: PUBACKs still missing after drain_timeout in_flight=%d", len(conn.sent))
        conn.flush_acks()
        conn.disconnect()
        try:
            async with asyncio.timeout(_DISCONNECT_WAIT_S):
                await conn.closed.wait()
        except TimeoutError:
            log.warning("link close: broker did not close after DISCONNECT; aborting")
        self._teardown()
        log.info("mqtt link closed host=%s port=%d stats=%s", self.config.host, self.config.port, self.stats)

    async def _flush_pending(self, conn: _Connection, max_priority: Priority) -> None:
        """Send the rows already pending up to `max_priority`, within the window."""
        while not conn.closed.is_set():
            await conn.window_open.wait()
            free = conn.window - len(conn.sent)
            if free <= 0:
                conn.window_open.clear()
                continue
            rows = await self.outbox.take(free, max_priority=max_priority, wait=False)
            if not rows:
                return
            now = time.time()
            for row in rows:
                if not conn.publish(row, now):
                    return

    def _teardown(self) -> None:
        conn = self._conn
        if conn is not None:
            conn.abort()
            conn.flush_acks()
            self._conn = None
        if self._running or conn is not None:
            self.outbox.release_inflight()
        self.connected.clear()
