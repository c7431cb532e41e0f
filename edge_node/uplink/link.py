"""The edge node's MQTT link: uplink from the durable outbox, downlink to a handler.

`Link.run()` keeps one `Connection` (connection.py) up: it connects (MQTT 5, or 3.1.1 when the
broker refuses 5 under `protocol = "auto"`), retries with jittered exponential backoff
(`common.backoff`; refused credentials wait the maximum), drains the outbox with at most a window
of publishes in flight, deletes rows once PUBACKed, and dispatches received messages to the
handler, acking each only after the handler finished.

Everything goes through the outbox; there is deliberately no direct publish. Rows in flight at a
disconnect are released back to the outbox and sent again on the next connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
from collections.abc import Awaitable, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTProtocolVersion

from common.backoff import Backoff
from common.tls import client_context
from edge_node.errors import ConfigError, ConnectFailure, OutboxClosedError, OutboxError
from edge_node.uplink.budget import ByteBudget
from edge_node.uplink.connection import ConnAck, Connection, Hooks, LinkConfig, LinkStats
from edge_node.uplink.message import IncomingMessage, OutMessage, Priority
from edge_node.uplink.outbox import Outbox

__all__ = ["CONNECTION_SEQUENCE", "IncomingMessage", "Link", "LinkConfig", "LinkStats", "MessageHandler"]

log = logging.getLogger(__name__)
# The outbox sequence that numbers the device's connections (status `connection`).
CONNECTION_SEQUENCE = "connection"

MessageHandler = Callable[[IncomingMessage], Awaitable[None] | None]

_DISCONNECT_WAIT_S = 2.0


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
        on_connected: Callable[[], Awaitable[None]] | None = None,
        meter: ByteBudget | None = None,
    ) -> None:
        self.config = config
        # Bytes per channel and the daily budget; a Link of its own (tests, tools) only counts.
        self.meter = meter if meter is not None else ByteBudget()
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
        self.on_connected = on_connected  # run after each connect's birth was queued
        self.stats = LinkStats()
        self.connected = asyncio.Event()
        self._closing = asyncio.Event()
        self._stopped = asyncio.Event()
        self._running = False
        self._outbox_closed = False
        self._conn: Connection | None = None
        self._backoff = Backoff(config.reconnect_min_s, config.reconnect_max_s)
        # Read once, here: a missing or malformed file is a ConfigError naming it, not a TLS
        # traceback at every reconnect.
        self._tls = (
            client_context(config.tls_ca, config.tls_cert, config.tls_key, error=ConfigError) if config.tls else None
        )
        self._hooks = Hooks(acked=self._acked, received=self._received, stats=self.stats, meter=self.meter)
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

    async def _connect_once(self) -> Connection | None:
        protocol = self._protocol or MQTTProtocolVersion.MQTTv5
        self.connection = await self._next_connection()
        conn = Connection(self.config, protocol, tls=self._tls, will=self.will(self.connection), hooks=self._hooks)
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

    async def _on_connected(self, conn: Connection, ack: ConnAck) -> None:
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
        if self.on_connected is not None:
            self.track(self.on_connected())

    async def _serve(self, conn: Connection) -> None:
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

    def _lost(self, conn: Connection) -> None:
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

    async def _drain(self, conn: Connection) -> None:
        """Publish outbox rows while the connection lives, at most `conn.window` unacked."""
        try:
            await self._send(conn, Priority.SAMPLES, wait=True)
        except OutboxClosedError:
            # Closing the outbox under a running link is a shutdown without close(): stop,
            # and let the will announce it.
            log.error("outbox closed while the link runs: the link stops")
            self._outbox_closed = True

    async def _send(self, conn: Connection, max_priority: Priority, *, wait: bool) -> None:
        """Publish rows up to `max_priority` within the window while `conn` lives; `wait=False`
        returns once the rows already pending are sent."""
        while not conn.closed.is_set():
            await conn.window_open.wait()
            free = conn.window - len(conn.sent)
            if free <= 0:
                conn.window_open.clear()
                continue
            rows = await self.outbox.take(free, max_priority=max_priority, wait=wait)
            if not rows:
                return
            now = time.time()
            for row in rows:
                if conn.closed.is_set() or not conn.publish(row, now):
                    return  # rows not sent stay in flight until _lost() or _teardown() releases them

    # ---- PUBACK deletes, downlink dispatch (called by the connection) ----------------------

    def _acked(self, row_ids: list[int]) -> None:
        try:
            self.outbox.ack(row_ids)
        except OutboxError as err:
            log.error("outbox ack failed rows=%d error=%s", len(row_ids), err)

    def _received(self, conn: Connection, message: mqtt.MQTTMessage) -> None:
        self.stats.received += 1
        incoming = _incoming(message)
        mid, qos = message.mid, message.qos
        try:
            result = self.on_message(incoming)
        except Exception:
            self.stats.handler_errors += 1
            log.exception("message handler failed topic=%s", incoming.topic)
            result = None
        if inspect.isawaitable(result):
            self.track(self._finish_handler(conn, result, mid, qos, incoming.topic))
        else:
            conn.ack_incoming(mid, qos)

    async def _finish_handler(self, conn: Connection, result: Awaitable[None], mid: int, qos: int, topic: str) -> None:
        try:
            await result
        except Exception:
            # A poison message is acked anyway: a redelivery would fail the same way, forever.
            self.stats.handler_errors += 1
            log.exception("message handler failed topic=%s", topic)
        conn.ack_incoming(mid, qos)

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
                await self._send(conn, drain, wait=False)
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

    def _teardown(self) -> None:
        conn = self._conn
        if conn is not None:
            conn.abort()
            conn.flush_acks()
            self._conn = None
        if self._running or conn is not None:
            self.outbox.release_inflight()
        self.connected.clear()
