"""Count an MQTT client's bytes per topic channel, from the raw TCP stream (a `TcpProxy` tap).

Billing on a cellular link is per byte on the wire, and small MQTT messages are mostly protocol: each
PUBLISH carries its topic name (unless a topic alias replaces it), a fixed header, a packet id and,
in MQTT 5, properties; every QoS 1 message costs a PUBACK the other way. Summing payload sizes misses
all of that, so this parses the stream itself (MQTT 3.1.1 and 5, including topic aliases) and books
every packet's full size:

* PUBLISH to the channel its topic names (the last level of a device topic: `results`,
  `telemetry`, `escalate/reply`, ...; `models` for model chunks; else the topic itself);
* PUBACK to `ack:<channel>` of the PUBLISH it acknowledges (so a channel's full cost is both), other
  control packets to `connect`, `subscribe`, `keepalive` or `other`.

Payloads are not decoded. Feed each connection's bytes in order, per direction; a TLS stream
cannot be parsed (count it as a whole).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["up", "down"]

_CONNECT, _CONNACK, _PUBLISH, _PUBACK = 1, 2, 3, 4
_SUBSCRIBE, _SUBACK, _UNSUBSCRIBE, _UNSUBACK, _PINGREQ, _PINGRESP, _DISCONNECT = 8, 9, 10, 11, 12, 13, 14
_CONTROL = {
    _CONNECT: "connect",
    _CONNACK: "connect",
    _SUBSCRIBE: "subscribe",
    _SUBACK: "subscribe",
    _UNSUBSCRIBE: "subscribe",
    _UNSUBACK: "subscribe",
    _PINGREQ: "keepalive",
    _PINGRESP: "keepalive",
    _DISCONNECT: "connect",
}
_TOPIC_ALIAS = 0x23
# MQTT 5 property ids -> value length (0: UTF-8 string or binary with a 2-byte length, -1: varint,
# -2: a string pair), to skip properties while looking for the topic alias.
_PROPERTY_SIZES = {
    0x01: 1, 0x02: 4, 0x03: 0, 0x08: 0, 0x09: 0, 0x0B: -1, 0x11: 4, 0x12: 0, 0x13: 2, 0x15: 0, 0x16: 0,
    0x17: 1, 0x18: 4, 0x19: 1, 0x1A: 0, 0x1C: 0, 0x1F: 0, 0x21: 2, 0x22: 2, 0x23: 2, 0x24: 1, 0x25: 1,
    0x26: -2, 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1,
}  # fmt: skip


def channel_of(topic: str) -> str:
    """The channel a topic belongs to: `fleet/f/d/escalate/reply` -> `escalate/reply`."""
    parts = topic.split("/")
    if (
        len(parts) >= 4
        and parts[-2] in ("escalate", "cmd", "model", "clock")
        and parts[-1] in ("reply", "ack", "request")
    ):
        return f"{parts[-2]}/{parts[-1]}"
    if len(parts) >= 3 and parts[-2] == "models":
        return "models"
    return parts[-1] if len(parts) >= 4 else topic


def _varint(data: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None while the bytes are not all there yet."""
    value, shift = 0, 0
    for i in range(4):
        if pos + i >= len(data):
            return None
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise ValueError("malformed MQTT remaining length")


@dataclass
class _Stream:
    """One direction of one connection."""

    buffer: bytearray = field(default_factory=bytearray)
    aliases: dict[int, str] = field(default_factory=dict)


@dataclass
class _Connection:
    version: int = 4  # 4 = 3.1.1, 5 = MQTT 5; learnt from CONNECT
    streams: dict[Direction, _Stream] = field(default_factory=lambda: {"up": _Stream(), "down": _Stream()})
    # (direction of the PUBLISH, packet id) -> its channel, to book the PUBACK that answers it
    pending: dict[tuple[Direction, int], str] = field(default_factory=dict)


class WireCounter:
    """Bytes and packets per (direction, channel) over any number of connections; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: dict[int, _Connection] = {}
        self.bytes: Counter[tuple[Direction, str]] = Counter()
        self.packets: Counter[tuple[Direction, str]] = Counter()
        # PUBLISHes that named their topic by an MQTT 5 alias alone (empty topic name)
        self.aliased: Counter[Direction] = Counter()

    def feed(self, connection: int, direction: Direction, data: bytes) -> None:
        with self._lock:
            conn = self._connections.setdefault(connection, _Connection())
            stream = conn.streams[direction]
            stream.buffer += data
            while (packet := self._next_packet(stream.buffer)) is not None:
                header, body_at, end = packet
                self._book(conn, direction, stream, header, bytes(stream.buffer[body_at:end]), end)
                del stream.buffer[:end]

    def snapshot(self) -> dict[tuple[Direction, str], int]:
        with self._lock:
            return dict(self.bytes)

    def packet_snapshot(self) -> dict[tuple[Direction, str], int]:
        with self._lock:
            return dict(self.packets)

    def total(self, direction: Direction | None = None) -> int:
        with self._lock:
            return sum(n for (d, _), n in self.bytes.items() if direction is None or d == direction)

    @staticmethod
    def _next_packet(buffer: bytearray) -> tuple[int, int, int] | None:
        if len(buffer) < 2:
            return None
        length = _varint(buffer, 1)
        if length is None:
            return None
        remaining, body_at = length
        end = body_at + remaining
        return (buffer[0], body_at, end) if len(buffer) >= end else None

    def _book(
        self, conn: _Connection, direction: Direction, stream: _Stream, header: int, body: bytes, size: int
    ) -> None:
        kind = header >> 4
        if kind == _CONNECT:
            # Protocol name (2-byte length + "MQTT"), then the level: 4 = 3.1.1, 5 = MQTT 5.
            name_len = int.from_bytes(body[:2], "big")
            conn.version = body[2 + name_len]
            channel = "connect"
        elif kind == _PUBLISH:
            channel = self._publish_channel(conn, direction, stream, header, body)
        elif kind == _PUBACK:
            packet_id = int.from_bytes(body[:2], "big")
            sent_by: Direction = "down" if direction == "up" else "up"
            channel = "ack:" + conn.pending.pop((sent_by, packet_id), "?")
        else:
            channel = _CONTROL.get(kind, "other")
        self.bytes[direction, channel] += size
        self.packets[direction, channel] += 1

    def _publish_channel(
        self, conn: _Connection, direction: Direction, stream: _Stream, header: int, body: bytes
    ) -> str:
        topic_len = int.from_bytes(body[:2], "big")
        topic = body[2 : 2 + topic_len].decode("utf-8", "replace")
        pos = 2 + topic_len
        qos = (header >> 1) & 0x3
        packet_id = None
        if qos:
            packet_id = int.from_bytes(body[pos : pos + 2], "big")
            pos += 2
        if conn.version == 5:
            alias = _topic_alias(body, pos)
            if alias is not None:
                if topic:
                    stream.aliases[alias] = topic
                else:
                    topic = stream.aliases.get(alias, f"alias:{alias}")
                    self.aliased[direction] += 1
        channel = channel_of(topic)
        if packet_id is not None:
            conn.pending[direction, packet_id] = channel
        return channel


def _topic_alias(body: bytes, pos: int) -> int | None:
    parsed = _varint(body, pos)
    if parsed is None:
        return None
    length, pos = parsed
    end = pos + length
    while pos < end:
        prop = body[pos]
        pos += 1
        size = _PROPERTY_SIZES.get(prop)
        if size is None:
            return None  # unknown property: cannot skip it safely
        if prop == _TOPIC_ALIAS:
            return int.from_bytes(body[pos : pos + 2], "big")
        if size > 0:
            pos += size
        elif size == 0:
            pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
        elif size == -1:
            skipped = _varint(body, pos)
            if skipped is None:
                return None
            pos = skipped[1]
        else:
            for _ in range(2):
                pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    return None


__all__ = ["WireCounter", "channel_of"]
