"""paho-mqtt 2.x driven from the asyncio event loop: the MQTT glue the edge link and the bridge share.

Why paho directly (both programs), not aiomqtt: QoS 1 acknowledged by hand only once a message is
durably handled (`manual_ack=True`), the PUBACK and CONNACK reason codes, the broker's Receive
Maximum, and no per-publish future or thread hop (aiomqtt's `publish()` awaits each PUBACK,
docs/traps.md #3). What is shared, written once:

* `LoopDriver`: paho's socket on the loop: readable -> `loop_read`, writable -> `loop_write`
  (registered and unregistered by paho's socket callbacks), a timer -> `loop_misc` (keep-alive).
  Every paho callback then runs on the loop thread: no locks. paho's `connect()` is blocking (DNS,
  TCP connect, TLS handshake): it runs in a worker thread, with the socket callbacks unhooked so that
  nothing touches the loop from there; the socket is attached to the loop once it returns.
* `new_client`: a paho client for MQTT 5 or 3.1.1 whose own queues never drop or block, and
  `connect_properties` for an MQTT 5 CONNECT (session expiry, Receive Maximum).
* `classify_error` / `classify_connack`: why a connection attempt failed, as (kind, detail), so each
  program raises its own error type. kind is dns | refused | tls | timeout | network (from the
  exception of the TCP/TLS connect) or auth | protocol | broker (from the CONNACK's reason code).

Reconnect delays are `common.backoff.Backoff`; TLS contexts `common.tls.client_context`.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
from collections.abc import Callable
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

# CONNACK reason codes (MQTT 5 values; paho maps the 3.1.1 return codes onto them).
_RC_UNSUPPORTED_PROTOCOL = 132
_RC_AUTH = frozenset({134, 135})  # bad user name or password, not authorized


class Failure(NamedTuple):
    """Why one connection attempt failed: `kind` for the program's logic, `detail` for people."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


def classify_error(err: BaseException) -> Failure:
    """Classify what paho's `connect()` raised (DNS, TCP connect, TLS handshake)."""
    if isinstance(err, socket.gaierror):
        return Failure("dns", f"cannot resolve host ({err})")
    if isinstance(err, ConnectionRefusedError):
        return Failure("refused", f"connection refused ({err})")
    if isinstance(err, ssl.SSLError | ssl.CertificateError):
        return Failure("tls", f"TLS handshake failed ({err})")
    if isinstance(err, TimeoutError):
        return Failure("timeout", f"connect timed out ({err})")
    return Failure("network", f"{type(err).__name__}: {err}")


def classify_connack(reason: ReasonCode) -> Failure:
    """Classify a CONNACK that refused the connection (`reason.is_failure`)."""
    if reason.value in _RC_AUTH:
        return Failure("auth", f"broker refused the credentials: {reason} ({reason.value})")
    if reason.value == _RC_UNSUPPORTED_PROTOCOL:
        return Failure("protocol", f"broker refused the protocol version: {reason} ({reason.value})")
    return Failure("broker", f"broker refused the connection: {reason} ({reason.value})")


def new_properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves __init__ unannotated


def connect_properties(*, session_expiry_s: int | None = None, receive_maximum: int | None = None) -> Properties:
    """MQTT 5 CONNECT properties: how long the broker keeps the session, how many unacked it may send us."""
    props = new_properties(PacketTypes.CONNECT)
    if session_expiry_s is not None:
        props.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    return props


def new_client(
    *,
    client_id: str,
    v5: bool,
    persistent: bool,
    username: str | None = None,
    password: str | None = None,
    tls: ssl.SSLContext | None = None,
    max_inflight: int = 0,
    connect_timeout_s: float | None = None,
    client_class: type[mqtt.Client] = mqtt.Client,
) -> mqtt.Client:
    """A paho client for MQTT 5 (`v5`) or 3.1.1, acking received QoS 1 messages by hand (`client.ack`).

    `persistent` asks a 3.1.1 broker to keep the session (clean session off); under MQTT 5 that is
    the CONNECT's clean start and session expiry (`connect_properties`). `max_inflight` 0 means no
    limit of paho's own. paho never queues past its in-flight limit (it would hide messages from
    us) and never reconnects by itself (that would block the loop): the caller reconnects.
    `client_class`: a subclass of paho's client (the bridge's has a cheaper receive path).
    """
    client = client_class(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=None if v5 else not persistent,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        reconnect_on_failure=False,
        manual_ack=True,
    )
    if connect_timeout_s is not None:
        client.connect_timeout = connect_timeout_s
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(max_inflight)
    if username is not None:
        client.username_pw_set(username, password)
    if tls is not None:
        client.tls_set_context(tls)
    return client


class LoopDriver:
    """Runs one paho client's network I/O on the running asyncio loop (paho starts no thread).

    `await connect(...)` per connection; `on_closed` is called (on the loop) when paho closes the
    socket, `abort()` drops the connection without a DISCONNECT. The same client may be connected
    again after its socket closed.

    `reads_per_wakeup`: paho's `loop_read` reads at most as many packets as it has messages in flight
    (at least one). A publisher with a window in flight reads its PUBACKs in one call (1 is enough);
    a subscriber has almost nothing in flight, so it reads again while the socket stays readable.
    """

    def __init__(
        self,
        client: mqtt.Client,
        *,
        misc_interval_s: float,
        reads_per_wakeup: int = 1,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self._misc_interval_s = misc_interval_s
        self._reads_per_wakeup = max(1, reads_per_wakeup)
        self._on_closed = on_closed
        self._sock: socket.socket | None = None
        self._misc: asyncio.TimerHandle | None = None

    @property
    def attached(self) -> bool:
        """True while the loop drives a connected socket."""
        return self._sock is not None

    async def connect(
        self,
        host: str,
        port: int,
        keepalive: int,
        *,
        clean_start: bool | None = None,
        properties: Properties | None = None,
    ) -> None:
        """TCP (+TLS) connect and send CONNECT, in a worker thread; then drive the socket from the loop.

        `clean_start` and `properties` are for MQTT 5 only. Raises what paho raises (OSError, its ssl
        subclasses; `classify_error` says which kind); the CONNACK arrives later, in `on_connect`.
        """
        if self._sock is not None:
            # A socket paho has not closed yet (e.g. no CONNACK came): paho closes it in connect().
            self._detach(self._sock)
        self._unhook()  # nothing may call into the loop from the worker thread
        kwargs: dict[str, Any] = {}
        if clean_start is not None:
            kwargs["clean_start"] = clean_start
        if properties is not None:
            kwargs["properties"] = properties
        await asyncio.to_thread(self.client.connect, host, port, keepalive, **kwargs)
        sock = self.client.socket()
        if not isinstance(sock, socket.socket):
            raise ConnectionError("paho returned no socket after connect")
        self._sock = sock
        client = self.client
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self.loop.add_reader(sock, self._readable)
        if client.want_write():
            self.loop.add_writer(sock, client.loop_write)
        self._misc = self.loop.call_later(self._misc_interval_s, self._tick)

    def abort(self) -> None:
        """Close the socket without DISCONNECT (the broker publishes the will). `on_closed` is not called."""
        sock = self._sock
        if sock is not None:
            self._detach(sock)
            sock.close()

    def _readable(self) -> None:
        client = self.client
        reads = 0
        while True:
            if client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            reads += 1
            sock = self._sock
            if sock is None:
                return
            # TLS may hold decrypted bytes that the file descriptor will never signal again, and a
            # client that buffers its reads (`buffered`, cloud_bridge.paho_client.py) bytes of its own.
            pending = getattr(client, "buffered", 0) > 0 or (isinstance(sock, ssl.SSLSocket) and sock.pending() > 0)
            if reads >= self._reads_per_wakeup:
                if pending:
                    self.loop.call_soon(self._readable)
                return
            if not pending and not select.select([sock], [], [], 0)[0]:
                return

    def _tick(self) -> None:
        self._misc = None
        if self._sock is None:
            return
        self.client.loop_misc()  # keep-alive: PINGREQ, or close a connection that stopped answering
        if self._sock is not None:
            self._misc = self.loop.call_later(self._misc_interval_s, self._tick)

    def _detach(self, sock: socket.socket) -> None:
        # After abort() paho may still hold the closed socket (fd -1): the loop must not be asked
        # about it again, hence the unhooking and the fileno checks.
        self._sock = None
        self._unhook()
        if sock.fileno() >= 0:
            self.loop.remove_reader(sock)
            self.loop.remove_writer(sock)
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None

    def _unhook(self) -> None:
        client = self.client
        client.on_socket_close = None
        client.on_socket_register_write = None
        client.on_socket_unregister_write = None

    # paho's socket callbacks (on the loop thread: they are hooked only while attached)

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if sock.fileno() >= 0:
            self.loop.add_writer(sock, client.loop_write)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if sock.fileno() >= 0:
            self.loop.remove_writer(sock)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._detach(sock)
        if self._on_closed is not None:
            self._on_closed()
