"""The bridge's paho client: what every message costs in paho, received or published.

A bridge at 10,000 devices takes ~2,300 messages a second, each a PUBLISH that paho 2.1 turns into
an `MQTTMessage` (with a `threading.Condition` of its own), an MQTT 5 `Properties` object (built
from two dicts of 27 entries, then cleared name by name, even when the packet has no property), a
pass through the per-topic callback matcher, and 3-4 `recv` system calls (one byte of command, the
remaining length byte by byte, then the body). Its PUBACK is one `send` call of 4 bytes. Measured
with py-spy on a bridge draining a backlog, that was about a third of the event loop.

`BridgeClient` keeps paho's protocol handling and changes only those costs:

* socket reads are buffered (`_sock_recv` reads up to 64 KiB and serves paho's small reads from
  it); `buffered` tells the loop driver that packets are waiting although the socket is not
  readable any more (common/mqtt.py `LoopDriver` reads on while it is non-zero);
* a PUBLISH at QoS 0 or 1 is parsed here, its MQTT 5 properties read for the two the bridge uses
  (Response Topic, Correlation Data; the others are skipped by their type), and handed to
  `on_incoming` as plain values. Anything unexpected (QoS 2, an unknown property, a topic that is
  not UTF-8, a packet too short) goes to paho's own `_handle_publish`, i.e. to `on_message` and
  paho's own errors;
* queued packets that need no per-packet completion (acks, QoS 1 publishes: paho completes those on
  their PUBACK) are written with one `send` instead of one each.

`message_callback_add` filters are not consulted on the fast path: the bridge uses none.

The bridge also publishes ~1,500 messages a second at that size (a confirm/1 per device every 10 s,
escalation replies, archived samples as JSON), and paho charged each the same again: a `Properties`
object for its Message Expiry or Correlation Data, and at its PUBACK another `Properties` and a
`ReasonCode` (even for a 2-byte PUBACK that has neither) and a scan of every message in flight
(`_update_inflight`, looking for one queued behind the in-flight limit). `publish_properties` packs
the two properties the bridge sends once, a bare successful PUBACK is completed without decoding
objects for it, and the scan runs only when some message is queued.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

# topic, payload, qos, mid, retain, response topic, correlation data
IncomingHandler = Callable[[str, bytes, int, int, bool, str | None, bytes | None], None]

_READ_SIZE = 65536
_WRITE_SIZE = 65536
_U16 = struct.Struct("!H")
_PUBLISH = paho.PUBLISH
_DISCONNECT = paho.DISCONNECT
# MQTT 5 PUBLISH property ids -> how to skip their value: 'b' one byte, 'i' four bytes, 'h' two,
# 's' a UTF-8 string, 'd' binary data, 'v' a variable byte integer, 'p' a string pair.
_MESSAGE_EXPIRY = 2
_RESPONSE_TOPIC = 8
_CORRELATION_DATA = 9
_PROPERTY_KINDS = {1: "b", 2: "i", 3: "s", 8: "s", 9: "d", 11: "v", 35: "h", 38: "p"}
_FIXED = {"b": 1, "h": 2, "i": 4}


class _Unexpected(Exception):
    """Something the fast path leaves to paho (which then parses it, or reports it malformed)."""


def _vbi(data: bytes, pos: int) -> tuple[int, int]:
    """A variable byte integer at `pos`: (value, position after it)."""
    value, shift = 0, 0
    for _ in range(4):
        if pos >= len(data):
            raise _Unexpected
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _Unexpected


def _properties(data: bytes, pos: int) -> tuple[str | None, bytes | None, int]:
    """Response Topic and Correlation Data of a PUBLISH's properties at `pos`, and where the payload starts."""
    length, pos = _vbi(data, pos)
    end = pos + length
    if end > len(data):
        raise _Unexpected
    response: str | None = None
    correlation: bytes | None = None
    while pos < end:
        ident, pos = _vbi(data, pos)
        kind = _PROPERTY_KINDS.get(ident)
        if kind is None:
            raise _Unexpected
        if kind in _FIXED:
            pos += _FIXED[kind]
        elif kind == "v":
            _, pos = _vbi(data, pos)
        else:
            for _ in range(2 if kind == "p" else 1):
                if pos + 2 > end:
                    raise _Unexpected
                (size,) = _U16.unpack_from(data, pos)
                value = data[pos + 2 : pos + 2 + size]
                pos += 2 + size
                if ident == _RESPONSE_TOPIC:
                    response = value.decode("utf-8")
                elif ident == _CORRELATION_DATA:
                    correlation = bytes(value)
        if pos > end:
            raise _Unexpected
    return response, correlation, end


class PackedProperties(Properties):
    """MQTT 5 PUBLISH properties packed at construction: paho's publish only calls `pack()` (when it
    sends, and again if it re-sends after a reconnect), and a `Properties` costs two dicts of 27
    entries to build."""

    def __init__(self, packed: bytes, text: str) -> None:  # no super().__init__: that is the cost
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "_packed", packed)
        object.__setattr__(self, "_text", text)

    def pack(self) -> bytes:
        packed: bytes = object.__getattribute__(self, "_packed")
        return packed

    def __str__(self) -> str:
        text: str = object.__getattribute__(self, "_text")
        return text

    __repr__ = __str__


def publish_properties(correlation_data: bytes | None, message_expiry_s: int | None) -> Properties | None:
    """The PUBLISH properties the bridge sends (Correlation Data, Message Expiry), or None for none."""
    body = b""
    if message_expiry_s is not None:
        body += bytes((_MESSAGE_EXPIRY,)) + struct.pack("!I", message_expiry_s)
    if correlation_data is not None:
        body += bytes((_CORRELATION_DATA,)) + _U16.pack(len(correlation_data)) + correlation_data
    if not body:
        return None
    length, size = bytearray(), len(body)
    while True:  # the properties' length, a variable byte integer
        size, digit = divmod(size, 128)
        length.append(digit | (0x80 if size else 0))
        if not size:
            break
    text = f"[MessageExpiryInterval: {message_expiry_s}, CorrelationData: {correlation_data!r}]"
    return PackedProperties(bytes(length) + body, text)


class BridgeClient(paho.Client):
    """A paho client with the cheaper receive path of the module docstring; set `on_incoming`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_incoming: IncomingHandler | None = None
        self._rbuf = b""
        self._rpos = 0
        self._rsock: object = None
        self._success: tuple[ReasonCode, Properties] | None = None  # shared by the PUBACKs of the fast path

    @property
    def buffered(self) -> int:
        """Bytes read from the socket that paho has not taken yet."""
        return len(self._rbuf) - self._rpos if self._rsock is self._sock else 0

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rsock is not self._sock:  # a new connection: the old one's bytes are gone
            self._rbuf, self._rpos, self._rsock = b"", 0, self._sock
        if self._rpos >= len(self._rbuf):
            data: bytes = super()._sock_recv(_READ_SIZE)
            if len(data) <= bufsize:
                return data
            self._rbuf, self._rpos = data, 0
        start = self._rpos
        self._rpos = min(start + bufsize, len(self._rbuf))
        return self._rbuf[start : self._rpos]

    def _handle_publish(self) -> MQTTErrorCode:
        handler = self.on_incoming
        header: int = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        if handler is None or qos == 2:
            return super()._handle_publish()
        data = bytes(self._in_packet["packet"])
        try:
            if len(data) < 2:
                raise _Unexpected
            (size,) = _U16.unpack_from(data, 0)
            pos = 2 + size
            if pos > len(data) or size == 0:
                raise _Unexpected  # (a v5 topic alias would be an empty topic: not used by the bridge)
            topic = data[2:pos].decode("utf-8")
            mid = 0
            if qos:
                if pos + 2 > len(data):
                    raise _Unexpected
                (mid,) = _U16.unpack_from(data, pos)
                pos += 2
            response: str | None = None
            correlation: bytes | None = None
            if self._protocol == MQTTProtocolVersion.MQTTv5:
                if pos < len(data) and data[pos] == 0:
                    pos += 1  # no properties: most device messages
                else:
                    response, correlation, pos = _properties(data, pos)
        except (_Unexpected, UnicodeDecodeError):
            return super()._handle_publish()
        with self._in_callback_mutex:
            handler(topic, data[pos:], qos, mid, bool(header & 0x01), response, correlation)
        if qos and not self._manual_ack:
            return self._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        # A successful PUBACK: the mid alone (MQTT 5 may add a 0 reason code and an empty property list).
        if cmd != "PUBACK" or not (len(packet) == 2 or (len(packet) <= 4 and not any(packet[2:]))):
            result: MQTTErrorCode = super()._handle_pubackcomp(cmd)
            return result
        (mid,) = _U16.unpack_from(packet, 0)
        if mid not in self._out_messages:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        if self._success is None:
            self._success = (ReasonCode(PacketTypes.PUBACK), Properties(PacketTypes.PUBACK))  # type: ignore[no-untyped-call]
        done: MQTTErrorCode = self._do_on_publish(mid, *self._success)
        return done

    def _update_inflight(self) -> MQTTErrorCode:
        # Every message in _out_messages is counted in flight unless it is queued: equal counts, none queued.
        if self._inflight_messages >= len(self._out_messages):
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        result: MQTTErrorCode = super()._update_inflight()
        return result

    def _packet_write(self) -> MQTTErrorCode:
        out: deque[Any] = self._out_packet
        if len(out) > 1:
            _coalesce(out)
        result: MQTTErrorCode = super()._packet_write()
        return result


def _coalesce(out: deque[Any]) -> None:
    """Join the packets at the head of `out` that need nothing after they are written into one."""
    parts: list[bytes] = []
    size = 0
    first = None
    while out and size < _WRITE_SIZE:
        packet = out[0]
        command = packet["command"] & 0xF0
        if command == _DISCONNECT or (command == _PUBLISH and packet["qos"] == 0):
            break  # paho completes these per packet (on_publish of QoS 0, the disconnect)
        out.popleft()
        first = first or packet
        chunk = packet["packet"][packet["pos"] :]
        parts.append(chunk)
        size += len(chunk)
    if len(parts) == 1:
        out.appendleft(first)
    elif parts:
        data = b"".join(parts)
        joined = {"command": paho.PUBACK, "mid": 0, "qos": 0, "pos": 0, "to_process": len(data), "packet": data}
        out.appendleft({**joined, "info": None})
