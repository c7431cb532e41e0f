"""One MQTT connection of the edge node: a fresh paho client per attempt, driven from the event loop.

Why paho-mqtt 2.x driven directly from the asyncio event loop (`common.mqtt`) rather than aiomqtt:

* Throughput of the durable path (docs/traps.md #3). aiomqtt's `publish()` awaits each PUBACK through a
  future per message on top of paho (≈ 110 µs CPU per publish, 17–19k msg/s even with a window);
  the target is ≥ 0.5× a bare paho QoS 1 publisher *including* the outbox's SQLite work. Driving
  paho ourselves costs paho's own ≈ 32 µs per publish and nothing more: a PUBACK is one `on_publish`
  callback that appends the row id to a list acked to the outbox once per loop iteration.
* Control. We need the PUBACK reason code (a failure counts as rejected, not retried forever), the
  broker's Receive Maximum from CONNACK (it narrows the window), manual acks of incoming QoS 1
  messages (`ack_incoming` only after the link's handler ran, so a crash before that gets the
  command redelivered by the persistent session), and distinct DNS / refused / TLS / auth errors
  (`ConnectFailure.kind`, classified by `common.mqtt`). aiomqtt hides or re-wraps most of these.

A fresh paho client is made per connection attempt, so paho never re-sends anything on its own: the
outbox is the only source of (re)transmissions, and rows in flight at a disconnect are released back
to it by the link and sent again (at-least-once; the `msg_id` identifies duplicates downstream).
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from common.mqtt import LoopDriver, classify_connack, classify_error, connect_properties, new_client, new_properties
from edge_node.errors import ConnectFailure
from edge_node.uplink.budget import ACK_SIZE, PROTOCOL, ByteBudget, channel_of, connect_size, publish_size, varint_size
from edge_node.uplink.message import OutMessage, Stored

log = logging.getLogger(__name__)

Protocol = Literal["mqtt5", "mqtt311", "auto"]

_MISC_INTERVAL_S = 1.0


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
    # MQTT 5 topic aliases the node may set (at most what the broker's CONNACK allows; 0 = none).
    topic_aliases: int = 16

    def __post_init__(self) -> None:
        if self.protocol not in ("mqtt5", "mqtt311", "auto"):
            raise ValueError(f"protocol must be mqtt5, mqtt311 or auto, got {self.protocol!r}")
        if self.inflight_window < 1:
            raise ValueError(f"inflight_window must be >= 1, got {self.inflight_window}")
        if not 0 <= self.topic_aliases <= 65535:
            raise ValueError(f"topic_aliases must be 0-65535, got {self.topic_aliases}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        if self.persistent and not self.client_id:
            raise ValueError("a persistent session (session_expiry_s > 0) needs a fixed client_id")

    @property
    def persistent(self) -> bool:
        return self.session_expiry_s > 0

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None


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


def publish_properties(msg: OutMessage, now: float) -> Properties | None:
    """MQTT 5 PUBLISH properties, or None when the message needs none (the common, cheap case)."""
    if not (
        msg.expires_at is not None
        or msg.user_properties
        or msg.response_topic
        or msg.correlation_data is not None
        or msg.content_type
    ):
        return None
    props = new_properties(PacketTypes.PUBLISH)
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


def _packed_size(props: Properties | None) -> int:
    """Bytes of MQTT 5 properties on the wire, their length included (1 for none)."""
    if props is None:
        return 1
    packed: bytes = props.pack()  # type: ignore[no-untyped-call]
    return len(packed)


@dataclass(slots=True)
class _Sent:
    row_id: int
    msg_id: str
    topic: str


@dataclass
class ConnAck:
    reason: ReasonCode
    session_present: bool
    properties: Properties | None


@dataclass(frozen=True)
class Hooks:
    """What a connection reports to its link: the PUBACKed rows (once per loop iteration, rejected
    ones too: the broker's answer will not change on a retry), each received message, and counts."""

    acked: Callable[[list[int]], None]
    received: Callable[[Connection, mqtt.MQTTMessage], None]  # ack it with `ack_incoming` once handled
    stats: LinkStats
    meter: ByteBudget  # bytes per channel, as MQTT encodes them (edge_node/uplink/budget.py)


class Connection:
    """One paho client bound to the event loop for the lifetime of one TCP connection.

    `open()` connects and waits for the CONNACK; then `publish` sends outbox rows with at most
    `window` unacked (`window_open` says when there is room), and PUBACKs go to `hooks.acked` once
    per loop iteration. `closed` is set when the connection ends, however it ends.
    """

    def __init__(
        self,
        config: LinkConfig,
        protocol: MQTTProtocolVersion,
        *,
        tls: ssl.SSLContext | None,
        will: OutMessage,
        hooks: Hooks,
    ) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.protocol = protocol
        self.hooks = hooks
        # Our window is the only gate: paho's own limit cannot follow the broker's Receive Maximum
        # (it is frozen once connected), and a second queue inside paho would hide rows from us.
        self.client = client = new_client(
            client_id=config.client_id,
            v5=self.v5,
            persistent=config.persistent,
            username=config.username,
            password=config.password,
            tls=tls,
            max_inflight=0,
            connect_timeout_s=config.connect_timeout_s,
        )
        self.driver = LoopDriver(client, misc_interval_s=_MISC_INTERVAL_S, on_closed=self._on_socket_closed)
        self.connack: asyncio.Future[ConnAck] = self.loop.create_future()
        self.closed = asyncio.Event()
        self.disconnect_reason: str = ""
        self.sent: dict[int, _Sent] = {}
        self.window = config.inflight_window
        self.window_open = asyncio.Event()
        self.window_open.set()
        self.all_acked = asyncio.Event()
        self.all_acked.set()
        self._acked: list[int] = []
        self._flush_scheduled = False
        # Topic -> alias on this network connection (MQTT 5 aliases die with it; a fresh client per
        # connection means paho never re-sends an aliased PUBLISH on a new one, docs/traps.md).
        self.aliases: dict[str, int] = {}
        self.alias_max = 0
        self._will = will
        client.will_set(
            will.topic,
            will.payload,
            qos=will.qos,
            retain=will.retain,
            properties=publish_properties(will, time.time()) if self.v5 else None,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe

    @property
    def v5(self) -> bool:
        return self.protocol == MQTTProtocolVersion.MQTTv5

    # ---- connecting ------------------------------------------------------------------------

    async def open(self) -> ConnAck:
        """TCP (+TLS) connect in a thread, then wait for the CONNACK on the loop."""
        cfg = self.config
        props: Properties | None = None
        clean_start: bool | None = None
        if self.v5:
            props = connect_properties(session_expiry_s=cfg.session_expiry_s if cfg.persistent else None)
            clean_start = not cfg.persistent
        try:
            await self.driver.connect(cfg.host, cfg.port, cfg.keepalive, clean_start=clean_start, properties=props)
        except (OSError, ssl.CertificateError) as err:
            raise ConnectFailure(*classify_error(err)) from err
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
            raise ConnectFailure(*classify_connack(ack.reason))
        receive_max = getattr(ack.properties, "ReceiveMaximum", None) if ack.properties else None
        if receive_max:
            self.window = min(self.window, int(receive_max))
        if self.v5 and ack.properties is not None:
            self.alias_max = min(cfg.topic_aliases, int(getattr(ack.properties, "TopicAliasMaximum", 0) or 0))
        self._count_connect(props, ack)
        return ack

    def _count_connect(self, props: Properties | None, ack: ConnAck) -> None:
        """Book the CONNECT (with its will) and the CONNACK: a reconnect's price on the link."""
        cfg, will = self.config, self._will
        fields = [cfg.client_id.encode(), will.topic.encode(), will.payload]
        fields += [v.encode() for v in (cfg.username, cfg.password) if v]
        props_size = _packed_size(props) + _packed_size(publish_properties(will, time.time())) if self.v5 else 0
        self.hooks.meter.sent(PROTOCOL, connect_size(fields, props_size))
        self.hooks.meter.received(PROTOCOL, 4 + (_packed_size(ack.properties) if self.v5 else 0))

    def _on_socket_closed(self) -> None:
        self._mark_closed("socket closed")

    def _mark_closed(self, reason: str) -> None:
        if not self.disconnect_reason:
            self.disconnect_reason = reason
        self.closed.set()
        self.window_open.set()  # wake the drain loop so it notices

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT (the broker will publish the will)."""
        self.driver.abort()
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
            self.connack.set_result(ConnAck(reason, bool(flags.session_present), properties))

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
            log.error("mqtt subscribe refused client_id=%s reasons=%s", self.config.client_id, failed)

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
        self.hooks.meter.received(channel_of(sent.topic), ACK_SIZE)
        stats = self.hooks.stats
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
        """Hand the PUBACKed rows of this loop iteration to the link in one batch."""
        self._flush_scheduled = False
        if not self._acked:
            return
        acked, self._acked = self._acked, []
        self.hooks.acked(acked)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        meter, channel = self.hooks.meter, channel_of(message.topic)
        meter.received(channel, self._publish_size(message.topic, message.payload, message.qos, message.properties))
        if message.qos > 0:
            meter.sent(channel, ACK_SIZE)  # our PUBACK, once the handler ran
        self.hooks.received(self, message)

    def ack_incoming(self, mid: int, qos: int) -> None:
        """PUBACK a received message (manual acks: only once its handler ran)."""
        if qos > 0 and not self.closed.is_set():
            # Acks after a reconnect would name a packet id of the old connection: the persistent
            # session redelivers that message instead.
            self.client.ack(mid, qos)

    # ---- publishing ------------------------------------------------------------------------

    def publish(self, row: Stored, now: float) -> bool:
        """Send one outbox row; False if paho refused it (the connection is gone)."""
        msg = row.msg
        props = publish_properties(msg, now) if self.v5 else None
        topic = msg.topic
        if self.alias_max:
            topic, props = self._aliased(topic, props)
        info = self.client.publish(topic, msg.payload, qos=msg.qos, retain=msg.retain, properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.debug("mqtt publish refused rc=%s topic=%s", info.rc, msg.topic)
            return False
        self.hooks.meter.sent(channel_of(msg.topic), self._publish_size(topic, msg.payload, msg.qos, props))
        self.sent[info.mid] = _Sent(row.row_id, msg.msg_id, msg.topic)
        self.all_acked.clear()
        if len(self.sent) >= self.window:
            self.window_open.clear()
        return True

    def _publish_size(self, topic: str, payload: bytes | bytearray, qos: int, props: Properties | None) -> int:
        return publish_size(len(topic.encode()), len(payload), qos, _packed_size(props) if self.v5 else None)

    def _aliased(self, topic: str, props: Properties | None) -> tuple[str, Properties]:
        """The topic name sent and the properties carrying its alias: the name with a new alias the
        first time on this connection, then the alias alone (a device publishes on a handful of
        topics, each ~35 bytes a PUBLISH saves)."""
        if props is None:
            props = new_properties(PacketTypes.PUBLISH)
        alias = self.aliases.get(topic)
        if alias is not None:
            props.TopicAlias = alias
            return "", props
        if len(self.aliases) < self.alias_max:
            self.aliases[topic] = props.TopicAlias = len(self.aliases) + 1
        return topic, props

    def subscribe(self, subscriptions: list[tuple[str, int]]) -> None:
        if not subscriptions:
            return
        # SUBSCRIBE: header, packet id, (properties,) each filter with its length and options; SUBACK
        # a reason code each.
        size = sum(3 + len(t.encode()) for t, _ in subscriptions) + 2 + (1 if self.v5 else 0)
        self.hooks.meter.sent(PROTOCOL, 1 + varint_size(size) + size)
        self.hooks.meter.received(PROTOCOL, 4 + (1 if self.v5 else 0) + len(subscriptions))
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
