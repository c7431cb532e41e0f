"""Encode and decode messages: orjson for the bytes, msgspec for the types and validation.

`decode*` functions raise only DecodeError (its `field` is a JSON path, its message says why),
so a consumer needs one `except` to route a bad payload to its dead-letter place.
"""

from __future__ import annotations

import functools
import operator
import re
from typing import Any, TypeVar

import msgspec
import orjson

from schemas.compact import is_compact, loads_compact
from schemas.errors import DecodeError, TopicError
from schemas.messages import (
    Alert,
    ClockReply,
    ClockRequest,
    Command,
    CommandAck,
    Confirm,
    Envelope,
    EscalationReply,
    EscalationRequest,
    Input,
    Message,
    ModelChunk,
    ModelChunkRequest,
    Result,
    Results,
    Sample,
    Status,
    Telemetry,
    schema_name,
)
from schemas.topics import AlertsTopic, Channel, DeviceTopic, ModelTopic, Topics

M = TypeVar("M", bound=Envelope)

KIB = 1024
DEFAULT_MAX_BYTES = 64 * KIB
# Messages that carry a tensor may be larger; anything bigger than these is refused before parsing.
MAX_BYTES: dict[type[Envelope], int] = {
    Sample: 1024 * KIB,
    Input: 1024 * KIB,
    EscalationRequest: 1024 * KIB,
    Telemetry: 256 * KIB,
    Results: 1024 * KIB,
    ModelChunk: 2048 * KIB + KIB,
}
LARGEST_MESSAGE = max(MAX_BYTES.values())

CHANNEL_TYPES: dict[Channel, type[Envelope]] = {
    Channel.STATUS: Status,
    Channel.TELEMETRY: Telemetry,
    Channel.SAMPLES: Sample,
    Channel.SAMPLES_JSON: Sample,
    Channel.RESULTS: Results,
    Channel.INPUT: Input,
    Channel.ESCALATE: EscalationRequest,
    Channel.ESCALATE_REPLY: EscalationReply,
    Channel.CMD: Command,
    Channel.CMD_ACK: CommandAck,
    Channel.MODEL_REQUEST: ModelChunkRequest,
    Channel.CONFIRM: Confirm,
    Channel.CLOCK: ClockRequest,
    Channel.CLOCK_REPLY: ClockReply,
}

# Older versions a reader still accepts on a channel, from devices not yet updated.
OLDER_TYPES: dict[Channel, tuple[type[Envelope], ...]] = {
    Channel.RESULTS: (Result,),
}

_AT_PATH = re.compile(r"^(?P<reason>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.S)


def max_bytes_for(message_type: type[Envelope]) -> int:
    return MAX_BYTES.get(message_type, DEFAULT_MAX_BYTES)


_ENCODER = msgspec.json.Encoder()


def encode(message: Envelope) -> bytes:
    """Serialise a message to compact JSON bytes (the `schema` tag included).

    msgspec's encoder writes the struct directly: the same bytes as orjson over `to_builtins`
    (a test checks it) at less than half the cost, and the edge pipeline encodes one per inference."""
    return _ENCODER.encode(message)


def to_builtins(message: Envelope) -> dict[str, Any]:
    """The message as plain dicts/lists (for the registry, logs or a dead-letter row)."""
    out = msgspec.to_builtins(message)
    assert isinstance(out, dict)
    return out


def _loads(data: bytes | bytearray | memoryview | str, limit: int, expected: str | None) -> Any:
    if len(data) > limit:
        raise DecodeError(f"payload is {len(data)} bytes, the limit is {limit}", schema=expected)
    if is_compact(data):
        assert not isinstance(data, str)
        return loads_compact(data, limit, expected)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"malformed JSON: {exc}", schema=expected) from None


def _convert(obj: Any, message_type: Any, expected: str | None) -> Any:
    if not isinstance(obj, dict):
        raise DecodeError(f"expected a JSON object (or a compact map), got {type(obj).__name__}", schema=expected)
    try:
        return msgspec.convert(obj, message_type, strict=True)
    except msgspec.ValidationError as exc:
        match = _AT_PATH.match(str(exc))
        assert match is not None
        raise DecodeError(match["reason"], field=match["path"] or "$", schema=expected) from None


def decode(data: bytes | bytearray | memoryview | str, message_type: type[M], *, max_bytes: int | None = None) -> M:
    """Decode and validate one message of a known type (and schema version)."""
    expected = schema_name(message_type)
    obj = _loads(data, max_bytes or max_bytes_for(message_type), expected)
    result: M = _convert(obj, message_type, expected)
    return result


@functools.cache
def _versions(
    current: type[Envelope], older: tuple[type[Envelope], ...]
) -> tuple[tuple[type[Envelope], ...], tuple[str, ...], int, Any, str]:
    """The versions a channel accepts, their schema names, their size limit, their union and the
    names joined for errors: the same for every message of a channel, so computed once."""
    versions: tuple[type[Envelope], ...] = (current, *older)
    names = tuple(schema_name(t) for t in versions)
    limit = max(max_bytes_for(t) for t in versions)
    return versions, names, limit, functools.reduce(operator.or_, older, current), " or ".join(names)


def _decode_versions(
    data: bytes | bytearray | memoryview | str, current: type[Envelope], older: tuple[type[Envelope], ...]
) -> Envelope:
    """Decode the current version of a message, or one of the older versions still accepted."""
    versions, names, limit, union, either = _versions(current, older)
    obj = _loads(data, limit, either)
    # An error inside a known version names that version; an unknown tag names every accepted one.
    declared = obj.get("schema") if isinstance(obj, dict) else None
    expected = declared if declared in names else either
    # The version the payload names, converted as that type alone: what the tagged union would
    # pick, at half the cost (msgspec converts to a union of Structs in ~5 µs, to one in ~3).
    target = next((t for t, name in zip(versions, names, strict=True) if name == declared), None)
    message: Envelope = _convert(obj, target or union, expected)
    limit = max_bytes_for(type(message))
    if len(data) > limit:
        raise DecodeError(f"payload is {len(data)} bytes, the limit is {limit}", schema=schema_name(type(message)))
    return message


def decode_any(data: bytes | bytearray | memoryview | str, *, max_bytes: int = LARGEST_MESSAGE) -> Message:
    """Decode a message of any known type, chosen by its `schema` field."""
    obj = _loads(data, max_bytes, None)
    result: Message = _convert(obj, Message, None)
    return result


def decode_for_topic(topics: Topics, topic: str, data: bytes | bytearray | memoryview | str) -> Message:
    """Decode a payload received on `topic`: the type follows the topic's channel, and the payload's
    fleet_id/device_id must be the topic's (a device may not speak for another one)."""
    try:
        where = topics.parse(topic)
    except TopicError as exc:
        raise DecodeError(str(exc), field="topic") from None
    message_type: type[Envelope]
    older: tuple[type[Envelope], ...] = ()
    if isinstance(where, AlertsTopic):
        message_type = Alert
    elif isinstance(where, ModelTopic):
        message_type = ModelChunk
    else:
        message_type = CHANNEL_TYPES[where.channel]
        older = OLDER_TYPES.get(where.channel, ())
    message: Message = _decode_versions(data, message_type, older) if older else decode(data, message_type)  # type: ignore[assignment]
    if message.fleet_id != where.fleet_id:
        raise DecodeError(
            f"fleet_id {message.fleet_id!r} does not match topic fleet {where.fleet_id!r}",
            field="$.fleet_id",
            schema=schema_name(message_type),
        )
    if isinstance(where, ModelTopic) and isinstance(message, ModelChunk) and message.sha256 != where.sha256:
        raise DecodeError(
            f"chunk of model {message.sha256} arrived on the topic of model {where.sha256}",
            field="$.sha256",
            schema=schema_name(message_type),
        )
    if isinstance(where, DeviceTopic) and message.device_id != where.device_id:
        raise DecodeError(
            f"device_id {message.device_id!r} does not match topic device {where.device_id!r}",
            field="$.device_id",
            schema=schema_name(message_type),
        )
    return message


def canonical_bytes(command: Command) -> bytes:
    """The bytes a command's Ed25519 signature covers: every field but `signature`, keys sorted."""
    body = to_builtins(command)
    body.pop("signature", None)
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
