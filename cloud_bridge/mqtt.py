"""An MQTT connection for the bridge: paho-mqtt 2.x driven from the asyncio event loop.

Why paho directly and not aiomqtt: the bridge must acknowledge a QoS 1 message only after it is
durably handled (registry commit), which needs paho's `manual_ack=True` + `client.ack(mid, qos)`;
aiomqtt 2.5.1 (the installed version) has no manual-ack option and acknowledges on receipt. Driving
paho from the loop (`common.mqtt.LoopDriver`: add_reader/add_writer calling loop_read/loop_write, a
timer calling loop_misc) also avoids aiomqtt's per-publish future and thread hops (docs/traps.md #3),
and keeps every paho callback on the event-loop thread, so no locks are needed. paho's blocking
connect (DNS, TCP, TLS handshake) runs in a worker thread.

Unlike the edge link, one paho client serves every connection of the process: after a reconnect
paho re-sends the publishes a lost connection left unacknowledged (their `publish()` calls have
failed with MqttError already). Reconnects wait a jittered exponential backoff (`common.backoff`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.properties import Properties

from cloud_bridge.config import MqttConfig
from cloud_bridge.errors import ConfigError, MqttError
from cloud_bridge.paho_client import BridgeClient, publish_properties
from common.backoff import Backoff
from common.mqtt import LoopDriver, classify_connack, classify_error, connect_properties, new_client
from common.tls import client_context
from schemas.topics import Topics

log = logging.getLogger(__name__)

_MISC_INTERVAL_S = 0.5
_READS_PER_WAKEUP = 256
_RECONNECT_MIN_S = 0.2
_RECONNECT_MAX_S = 10.0
_SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason code


@dataclass(frozen=True, slots=True)
class Incoming:
    """One received message; `generation` is the connection it arrived on (acks are per connection)."""

    topic: str
    payload: bytes | bytearray
    qos: int
    mid: int
    generation: int
    response_topic: str | None
    correlation_data: bytes | None


MessageHandler = Callable[[Incoming], None]


@dataclass(frozen=True, slots=True)
class SharedProbe:
    """Checks that the broker delivers shared subscriptions: a message published to `topic` must come
    back through `$share/<group>/<topic>`. Some brokers ignore `$share` (amqtt, MQTT 3.1.1 only: the
    subscription silently matches nothing), and then nothing reaches the bridge at all. `fallback`:
    subscribe without `$share` instead (every bridge then takes every message; the registry's msg_id
    dedup keeps them right) rather than refuse to run."""

    group: str
    topic: str
    fallback: bool
    wait_s: float = 3.0


class MqttConnection:
    """One paho client on the running event loop, reconnecting with backoff until `close()`."""

    def __init__(
        self,
        config: MqttConfig,
        subscriptions: list[tuple[str, int]],
        on_message: MessageHandler,
        probe: SharedProbe | None = None,
    ) -> None:
        self._config = config
        self._subscriptions = subscriptions
        self._probe = probe if any(f.startswith("$share/") for f, _ in subscriptions) else None
        self._probe_seen = asyncio.Event()
        self.sessions_lost = 0  # reconnects whose session the broker had not kept
        # QoS 1 messages of this connection taken but not yet acknowledged: when it sits at the
        # broker's in-flight limit (Receive Maximum / max_inflight_messages), acks pace the intake.
        self.unacked = 0
        self._on_message_cb = on_message
        self._loop = asyncio.get_running_loop()
        self._v5 = config.protocol == "mqtt5"
        # Read once, here: a missing or malformed CA file is a ConfigError naming it.
        self._tls = None if config.tls_ca is None else client_context(config.tls_ca, error=ConfigError)
        self._client = self._make_client()
        self._driver = LoopDriver(self._client, misc_interval_s=_MISC_INTERVAL_S, reads_per_wakeup=_READS_PER_WAKEUP)
        self._backoff = Backoff(_RECONNECT_MIN_S, _RECONNECT_MAX_S)
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._closing = False
        self._generation = 0
        self._pending_publishes: dict[int, asyncio.Future[None]] = {}
        self._pending_sub_mid: int | None = None
        self._window = asyncio.Semaphore(config.publish_window)
        self._connect_error: str | None = None
        self._session_ready = asyncio.Condition()
        self._ready_generation = 0
        self._session_present = False

    # -- setup -------------------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        cfg = self._config
        # paho's own queues must never drop or block: the broker's Receive Maximum and our publish
        # window are the bounds.
        client = new_client(
            client_id=cfg.client_id,
            v5=self._v5,
            persistent=True,
            username=cfg.username,
            password=cfg.password,
            tls=self._tls,
            max_inflight=max(20, cfg.publish_window),
            client_class=BridgeClient,
        )
        assert isinstance(client, BridgeClient)
        client.on_incoming = self._on_incoming
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def generation(self) -> int:
        return self._generation

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Connect, subscribe, and keep reconnecting until `close()`; sets `ready` once subscribed."""
        try:
            while not self._closing:
                try:
                    await self._connect_once()
                except MqttError as exc:
                    delay = self._backoff.next_delay()
                    log.warning(
                        "mqtt connect failed host=%s port=%d error=%s retry_s=%.1f",
                        self._config.host,
                        self._config.port,
                        exc,
                        delay,
                    )
                    await self._sleep_unless_closing(delay)
                    continue
                self._backoff.reset()
                if ready is not None:
                    ready.set()
                await self._disconnected.wait()
                if not self._closing:
                    await self._sleep_unless_closing(self._backoff.next_delay())
        finally:
            if not self._connected.is_set():
                # Stopped while connecting (or cancelled): no DISCONNECT to send, drop the socket.
                self._driver.abort()

    async def _sleep_unless_closing(self, delay: float) -> None:
        # Waiting on the disconnected event doubles as a close() wake-up.
        self._disconnected.clear()
        if self._closing:
            return
        try:
            await asyncio.wait_for(self._disconnected.wait(), delay)
        except TimeoutError:
            return

    async def _connect_once(self) -> None:
        cfg = self._config
        self._connected.clear()
        self._disconnected.clear()
        self._subscribed.clear()
        self._connect_error = None
        props: Properties | None = None
        if self._v5:
            props = connect_properties(session_expiry_s=cfg.session_expiry_s, receive_maximum=cfg.receive_maximum)
        try:
            await self._driver.connect(
                cfg.host, cfg.port, cfg.keepalive, clean_start=False if self._v5 else None, properties=props
            )
        except OSError as err:
            raise MqttError(str(classify_error(err))) from err
        await self._wait_either(self._connected, cfg.keepalive)
        if self._connect_error is not None:
            raise MqttError(self._connect_error)
        if self._subscriptions:
            result, mid = self._client.subscribe(self._subscriptions)
            if result != paho.MQTT_ERR_SUCCESS:
                raise MqttError(f"subscribe failed: {paho.error_string(result)}")
            self._pending_sub_mid = mid
            await self._wait_either(self._subscribed, cfg.keepalive)
            if not self._subscribed.is_set():
                raise MqttError("broker did not acknowledge the subscription")
        if self._probe is not None:
            await self._check_shared(self._probe)
        async with self._session_ready:
            self._ready_generation = self._generation
            self._session_ready.notify_all()
        log.info(
            "mqtt connected host=%s port=%d client_id=%s generation=%d subscriptions=%d",
            cfg.host,
            cfg.port,
            cfg.client_id,
            self._generation,
            len(self._subscriptions),
        )

    async def _check_shared(self, probe: SharedProbe) -> None:
        """Publish to the probe topic and wait for it through `$share` (see SharedProbe)."""
        self._probe_seen.clear()
        shared = Topics.shared(probe.group, probe.topic)
        self._client.subscribe(shared, qos=1)
        await self.publish(probe.topic, b"probe", qos=1)
        try:
            await asyncio.wait_for(self._probe_seen.wait(), probe.wait_s)
            return
        except TimeoutError:
            pass
        finally:
            self._client.unsubscribe(shared)
        where = f"{self._config.host}:{self._config.port}"
        if not probe.fallback:
            raise ConfigError(
                f"the broker at {where} does not deliver shared subscriptions ($share/...): nothing would reach "
                "this bridge; use a broker with MQTT 5 shared subscriptions, or set [fleet] shared = false "
                "(every bridge then takes every message), or [fleet] shared_fallback = true"
            )
        log.error(
            "the broker at %s does not deliver shared subscriptions: subscribing without $share instead "
            "(every bridge takes every message; dedup keeps the registry right)",
            where,
        )
        self._probe = None
        self._client.unsubscribe([f for f, _ in self._subscriptions if f.startswith("$share/")])
        self._subscriptions = [
            (f.split("/", 2)[2] if f.startswith("$share/") else f, q) for f, q in self._subscriptions
        ]
        self._subscribed.clear()
        result, self._pending_sub_mid = self._client.subscribe(self._subscriptions)
        if result != paho.MQTT_ERR_SUCCESS:
            raise MqttError(f"subscribe failed: {paho.error_string(result)}")
        await self._wait_either(self._subscribed, self._config.keepalive)

    async def _wait_either(self, event: asyncio.Event, limit_s: float) -> None:
        waiters = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._disconnected.wait())}
        done, pending = await asyncio.wait(waiters, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if not done:
            raise MqttError(f"no answer from the broker within {limit_s}s")
        if self._disconnected.is_set() and not event.is_set():
            raise MqttError(self._connect_error or "connection closed by the broker")

    def add_subscriptions(self, subscriptions: list[tuple[str, int]]) -> None:
        """Subscribe to more filters: now if connected, and at every later connect."""
        self._subscriptions.extend(subscriptions)
        if self._connected.is_set():
            result, _mid = self._client.subscribe(subscriptions)
            if result != paho.MQTT_ERR_SUCCESS:
                log.warning("mqtt subscribe failed filters=%s error=%s", subscriptions, paho.error_string(result))

    async def wait_subscribed(self, generation: int) -> None:
        """Wait until connection number `generation` (1 = first) is up and subscribed."""
        async with self._session_ready:
            await self._session_ready.wait_for(lambda: self._ready_generation >= generation)

    async def close(self) -> None:
        """Disconnect cleanly (pending acks are lost: the broker redelivers them to the next session)."""
        self._closing = True
        if self._connected.is_set():
            self._client.disconnect()
        self._disconnected.set()

    # -- publish / ack -----------------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        correlation_data: bytes | None = None,
        *,
        message_expiry_s: int | None = None,
    ) -> None:
        """Publish and wait for the PUBACK (QoS 1); the window bounds how many are in flight at once.
        `message_expiry_s` (MQTT 5 only) lets the broker drop a command nobody fetched in time."""
        async with self._window:
            if not self._connected.is_set():
                raise MqttError(f"not connected: cannot publish to {topic}")
            props = (
                publish_properties(correlation_data, message_expiry_s and max(1, message_expiry_s))
                if self._v5
                else None
            )
            info = self._client.publish(topic, payload, qos=qos, properties=props)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
            if qos == 0:
                return
            future: asyncio.Future[None] = self._loop.create_future()
            self._pending_publishes[info.mid] = future
            await future

    def ack(self, message: Incoming) -> bool:
        """PUBACK a message if it came on the current connection (else the broker redelivers it)."""
        if message.qos == 0:
            return True
        if message.generation != self._generation or not self._connected.is_set():
            return False
        self._client.ack(message.mid, message.qos)
        self.unacked -= 1
        return True

    # -- paho callbacks (all run on the event-loop thread) -----------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._connect_error = str(classify_connack(reason))
            self._disconnected.set()
            return
        if self._generation and self._v5 and not flags.session_present:
            # The broker forgot this bridge's session (restarted without persistence, or the session
            # expired): what devices published meanwhile was queued for nobody. Devices with confirmed
            # delivery send it again; the count says it happened.
            self.sessions_lost += 1
            log.warning("mqtt session not kept by the broker: messages published while away were not queued")
        self._generation += 1
        self.unacked = 0  # what the last connection left unacked, the broker sends again
        self._connected.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._disconnected.set()
        for future in self._pending_publishes.values():
            if not future.done():
                future.set_exception(MqttError(f"connection lost before PUBACK: {reason}"))
        self._pending_publishes.clear()
        if was_connected and not self._closing:
            log.warning("mqtt disconnected reason=%s", reason)
        if getattr(reason, "value", None) == _SESSION_TAKEN_OVER:
            # Another connection took this client id: two bridges configured alike, or a broker that
            # makes the username the client id (use_username_as_clientid) giving the escalation
            # session and the main one the same id, so that each keeps taking the other's session.
            log.error(
                "mqtt session taken over client_id=%s username=%s: another connection uses this client id; give each "
                "bridge its own [mqtt] client_id, and with use_username_as_clientid give the escalation session an "
                'account of its own ([escalation] username/password) or set [escalation] session = "shared"',
                self._config.client_id,
                self._config.username,
            )

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        # What BridgeClient leaves to paho (cloud_bridge.paho_client.py): QoS 2, unusual properties.
        props = getattr(msg, "properties", None)
        response_topic: str | None = getattr(props, "ResponseTopic", None)
        correlation: bytes | None = getattr(props, "CorrelationData", None)
        self._on_incoming(msg.topic, msg.payload, msg.qos, msg.mid, msg.retain, response_topic, correlation)

    def _on_incoming(
        self,
        topic: str,
        payload: bytes | bytearray,
        qos: int,
        mid: int,
        retain: bool,
        response_topic: str | None,
        correlation: bytes | None,
    ) -> None:
        if self._probe is not None and topic == self._probe.topic:
            self._probe_seen.set()
            if qos:
                self._client.ack(mid, qos)
            return
        if qos:
            self.unacked += 1
        self._on_message_cb(Incoming(topic, payload, qos, mid, self._generation, response_topic, correlation))

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        future = self._pending_publishes.pop(mid, None)
        if future is None or future.done():
            return
        if getattr(reason, "is_failure", False):
            future.set_exception(MqttError(f"broker rejected publish: {reason}"))
        else:
            future.set_result(None)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        if mid != self._pending_sub_mid:
            return
        failed = [r for r in reasons if getattr(r, "is_failure", False)]
        if failed:
            self._connect_error = f"subscription refused: {failed}"
            log.error("mqtt subscription refused reasons=%s", failed)
            return
        self._subscribed.set()
