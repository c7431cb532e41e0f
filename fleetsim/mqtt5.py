"""A minimal MQTT 5 client for the simulator: QoS 1 publishes batched into one socket write per tick.

paho sends every publish with its own `send()` system call, and on the loopback interface the
kernel runs the broker side of TCP inside that call: measured, ~200 µs of the simulator's wall
time per message under load, more than building the message. Thousands of devices share a
handful of connections here, so a connection collects the PUBLISH packets of one tick in a
buffer and writes it at once, and reads PUBACKs, replies and commands in bulk.

What it speaks: CONNECT (clean start, user name and password, keepalive), SUBSCRIBE at QoS 1,
PUBLISH at QoS 1 out (at most the broker's Receive Maximum in flight, the rest queued in order)
and at QoS 0 or 1 in (acknowledged), PUBACK both ways (a refusal, reason code >= 0x80, is
counted per kind), PINGREQ, DISCONNECT. TLS through an `ssl.SSLContext`. No retained-message
bookkeeping, no resend across reconnects: a lost connection ends the run with `LinkError`, since
a simulator that silently reconnected would under-count what it offered.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP, DISCONNECT = 2, 3, 4, 9, 13, 14
_PINGREQ = b"\xc0\x00"
READ_SIZE = 1 << 18
# MQTT 5 property ids -> value size (0: two-byte length and bytes, -1: varint, -2: string pair).
_PROPERTY_SIZES = {
    0x01: 1, 0x02: 4, 0x03: 0, 0x08: 0, 0x09: 0, 0x0B: -1, 0x11: 4, 0x12: 0, 0x13: 2, 0x15: 0, 0x16: 0,
    0x17: 1, 0x18: 4, 0x19: 1, 0x1A: 0, 0x1C: 0, 0x1F: 0, 0x21: 2, 0x22: 2, 0x23: 2, 0x24: 1, 0x25: 1,
    0x26: -2, 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1,
}  # fmt: skip
_CONNACK_REASONS = {
    0x80: "unspecified error", 0x84: "unsupported protocol version", 0x85: "client identifier not valid",
    0x86: "bad user name or password", 0x87: "not authorized", 0x88: "server unavailable", 0x89: "server busy",
    0x8A: "banned", 0x8C: "bad authentication method", 0x97: "quota exceeded",
}  # fmt: skip

_PID_NO_PROPERTIES = struct.Struct("!HB")  # packet id, then a property length of 0

OnMessage = Callable[[float, str, bytes], None]


class LinkError(Exception):
    """The broker refused or dropped a connection (the message says which and why)."""


@dataclass(frozen=True)
class Broker:
    """Where and how to connect."""

    host: str = "127.0.0.1"
    port: int = 1883
    tls: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 60


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def _read_varint(data: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None when `data` ends inside it."""
    value, shift = 0, 0
    while pos < len(data):
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise LinkError("malformed variable byte integer from the broker")
    return None


def _properties(body: bytes, pos: int) -> tuple[dict[int, int], int]:
    """The integer properties at `pos` (others skipped) and the position after them."""
    parsed = _read_varint(body, pos)
    if parsed is None:
        raise LinkError("truncated properties from the broker")
    length, pos = parsed
    end, found = pos + length, {}
    while pos < end:
        pid, pos = body[pos], pos + 1
        size = _PROPERTY_SIZES.get(pid)
        if size is None:
            raise LinkError(f"unknown MQTT 5 property 0x{pid:02x} from the broker")
        if size > 0:
            found[pid] = int.from_bytes(body[pos : pos + size], "big")
            pos += size
        elif size == -1:
            parsed = _read_varint(body, pos)
            if parsed is None:
                raise LinkError("truncated property from the broker")
            found[pid], pos = parsed
        else:
            for _ in range(1 if size == 0 else 2):
                pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    return found, end


class Connection:
    """One MQTT 5 connection carrying many devices' traffic (driven by `fleetsim.pump`)."""

    def __init__(self, broker: Broker, client_id: str, on_message: OnMessage, timeout_s: float = 30.0) -> None:
        self.client_id, self.on_message, self.keepalive_s = client_id, on_message, broker.keepalive_s
        self.out = bytearray()
        self.inbuf = bytearray()
        self.inflight: dict[int, str] = {}  # packet id -> kind, awaiting PUBACK
        self.queued: deque[tuple[bytes, bytes, bool, str]] = deque()
        self.refused: Counter[tuple[str, int]] = Counter()  # (kind, reason code) -> PUBACKs refusing
        self.acked = 0
        self.subacks = 0
        self.close_error = ""
        self._next_id = 0
        self._last_sent = time.monotonic()
        try:
            raw = socket.create_connection((broker.host, broker.port), timeout=timeout_s)
        except OSError as exc:
            raise LinkError(f"cannot connect to {broker.host}:{broker.port}: {exc}") from None
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock: socket.socket = broker.tls.wrap_socket(raw, server_hostname=broker.host) if broker.tls else raw
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            raise LinkError(f"TLS handshake with {broker.host}:{broker.port} failed: {exc}") from None
        self.sock = sock
        self.receive_maximum = self._handshake(broker)
        sock.setblocking(False)

    def _handshake(self, broker: Broker) -> int:
        flags = 0x02  # clean start; the session ends with the connection (expiry 0)
        payload = _string(self.client_id)
        if broker.username is not None:
            flags |= 0x80
            payload += _string(broker.username)
        if broker.password is not None:
            flags |= 0x40
            payload += _string(broker.password.encode())
        variable = _string("MQTT") + bytes((5, flags)) + struct.pack("!H", broker.keepalive_s) + b"\x00"
        body = variable + payload
        self.sock.sendall(b"\x10" + varint(len(body)) + body)
        kind, packet = self._read_blocking()
        if kind != CONNACK or len(packet) < 2:
            raise LinkError(f"{self.client_id}: expected CONNACK, got packet type {kind}")
        reason = packet[1]
        if reason >= 0x80:
            why = _CONNACK_REASONS.get(reason, "refused")
            raise LinkError(f"{broker.host}:{broker.port} refused {self.client_id}: {why} (reason 0x{reason:02x})")
        props, _ = _properties(packet, 2)
        return props.get(0x21, 65535)

    def _read_blocking(self) -> tuple[int, bytes]:
        while True:
            parsed = self._split()
            if parsed is not None:
                return parsed
            try:
                chunk = self.sock.recv(READ_SIZE)
            except (OSError, TimeoutError) as exc:
                raise LinkError(f"{self.client_id}: no CONNACK: {exc}") from None
            if not chunk:
                raise LinkError(f"{self.client_id}: the broker closed the connection before CONNACK")
            self.inbuf += chunk

    def _split(self) -> tuple[int, bytes] | None:
        """The first complete packet of the input buffer (type, body), removed from it."""
        if len(self.inbuf) < 2:
            return None
        parsed = _read_varint(self.inbuf, 1)
        if parsed is None:
            return None
        length, start = parsed
        if len(self.inbuf) < start + length:
            return None
        kind, body = self.inbuf[0] >> 4, bytes(self.inbuf[start : start + length])
        del self.inbuf[: start + length]
        return kind, body

    def fileno(self) -> int:
        return self.sock.fileno()

    def subscribe(self, filters: list[str], chunk: int = 200) -> int:
        """SUBSCRIBE to `filters` at QoS 1; returns how many SUBACKs to wait for (`subacks`)."""
        packets = 0
        for start in range(0, len(filters), chunk):
            body = struct.pack("!H", self._packet_id()) + b"\x00"
            body += b"".join(_string(f) + b"\x01" for f in filters[start : start + chunk])
            self.out += b"\x82" + varint(len(body)) + body
            packets += 1
        return packets

    def _packet_id(self) -> int:
        while True:
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self.inflight:
                return self._next_id

    def publish(self, topic: bytes, payload: bytes, kind: str, retain: bool = False) -> None:
        """Queue a QoS 1 PUBLISH (`topic` with its two length bytes, `fleetsim.wire.topic_field`);
        it goes out with the next `flush`, or once a PUBACK makes room under Receive Maximum."""
        if len(self.inflight) >= self.receive_maximum or self.queued:
            self.queued.append((topic, payload, retain, kind))
            return
        self._write_publish(topic, payload, retain, kind)

    def _write_publish(self, topic: bytes, payload: bytes, retain: bool, kind: str) -> None:
        pid = self._packet_id()
        self.inflight[pid] = kind
        length = len(topic) + 3 + len(payload)
        out = self.out
        out.append(0x33 if retain else 0x32)
        if length < 0x4000:  # two bytes of remaining length: every message the profile sends
            out.append(length & 0x7F | (0x80 if length > 0x7F else 0))
            if length > 0x7F:
                out.append(length >> 7)
        else:
            out += varint(length)
        out += topic
        out += _PID_NO_PROPERTIES.pack(pid, 0)
        out += payload

    def wants_write(self) -> bool:
        return bool(self.out)

    def flush(self) -> None:
        """Write what the socket takes now (the rest stays for the next call)."""
        if not self.out:
            return
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return
        except OSError as exc:
            raise LinkError(f"{self.client_id}: connection lost while sending: {exc}") from None
        del self.out[:sent]
        self._last_sent = time.monotonic()

    def read(self) -> None:
        """Read what arrived and handle every complete packet in it."""
        while True:
            try:
                chunk = self.sock.recv(READ_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError as exc:
                raise LinkError(f"{self.client_id}: connection lost: {exc}") from None
            if not chunk:
                raise LinkError(f"{self.client_id}: the broker closed the connection")
            self.inbuf += chunk
            if not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()) and len(chunk) < READ_SIZE:
                break
        self._handle_all(time.time())

    def _handle_all(self, now: float) -> None:
        buf, pos, end = self.inbuf, 0, len(self.inbuf)
        while pos + 2 <= end:
            first = buf[pos]
            if first == 0x40 and buf[pos + 1] == 2 and pos + 4 <= end:  # PUBACK, success: the hot path
                self.inflight.pop((buf[pos + 2] << 8) | buf[pos + 3], None)
                self.acked += 1
                pos += 4
                continue
            parsed = _read_varint(buf, pos + 1)
            if parsed is None:
                break
            length, start = parsed
            if start + length > end:
                break
            self._handle(first, bytes(buf[start : start + length]), now)
            pos = start + length
        del buf[:pos]
        while self.queued and len(self.inflight) < self.receive_maximum:
            topic, payload, retain, kind = self.queued.popleft()
            self._write_publish(topic, payload, retain, kind)

    def _handle(self, first: int, body: bytes, now: float) -> None:
        kind = first >> 4
        if kind == PUBLISH:
            qos = (first >> 1) & 3
            n = int.from_bytes(body[:2], "big")
            topic = body[2 : 2 + n].decode()
            pos = 2 + n
            if qos:
                self.out += b"\x40\x02" + body[pos : pos + 2]
                pos += 2
            _, pos = _properties(body, pos)
            self.on_message(now, topic, body[pos:])
        elif kind == PUBACK:
            pid = int.from_bytes(body[:2], "big")
            sent_kind = self.inflight.pop(pid, "?")
            self.acked += 1
            if len(body) > 2 and body[2] >= 0x80:
                self.refused[(sent_kind, body[2])] += 1
        elif kind == SUBACK:
            self.subacks += 1
            _, pos = _properties(body, 2)
            refused = [code for code in body[pos:] if code >= 0x80]
            if refused:
                raise LinkError(f"{self.client_id}: the broker refused a subscription (reason 0x{refused[0]:02x})")
        elif kind == DISCONNECT:
            reason = body[0] if body else 0
            raise LinkError(f"{self.client_id}: the broker disconnected it (reason 0x{reason:02x})")
        elif kind != PINGRESP:
            raise LinkError(f"{self.client_id}: unexpected packet type {kind} from the broker")

    def keepalive(self, now: float) -> None:
        """A PINGREQ when nothing was written for half the keepalive interval."""
        if now - self._last_sent > self.keepalive_s / 2 and not self.out:
            self.out += _PINGREQ

    def close(self) -> None:
        """DISCONNECT (normal) and close the socket."""
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(5)
            self.sock.sendall(bytes(self.out) + b"\xe0\x00")
        except OSError as exc:  # closing anyway: the broker treats a lost connection like a disconnect
            self.close_error = str(exc)
        finally:
            self.sock.close()


def pump(connections: Sequence[Connection], timeout: float) -> None:
    """Wait up to `timeout` for a socket to be readable (or writable, when bytes wait to go out),
    then read, write and keep every connection alive."""
    writers = [c for c in connections if c.out]
    readable, writable, _ = select.select(connections, writers, [], max(0.0, timeout))
    for c in readable:
        c.read()
    for c in writable:
        c.flush()
    now = time.monotonic()
    for c in connections:
        c.keepalive(now)


def flush_all(connections: Sequence[Connection]) -> None:
    """Write what each connection holds, as far as its socket takes it now."""
    for c in connections:
        c.flush()


def pump_until(connections: Sequence[Connection], deadline: float, done: Callable[[], bool] | None = None) -> bool:
    """Pump until `time.monotonic()` passes `deadline` or `done()` is true (returns whether it is)."""
    while True:
        if done is not None and done():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return done is not None and done()
        flush_all(connections)
        pump(connections, min(left, 0.05) if done is not None else left)
