"""The simulator's payloads: the compact frames of schemas/compact.py, built for a fraction of the cost.

`schemas.compact.encode_compact` turns a typed message into builtins, walks every value of it in
Python to find the lists it rewrites as columns (schemas/compact_columns.py), then deflates with a
fresh compressor primed with the preset dictionary. For a results message of ten answers that is
~40 µs, for a telemetry window ~110 µs: most of what the old simulator spent per message.

Here the simulator's state is already columnar (a device keeps its pending answers as rows of plain
values, its window's features as float32 arrays), so each frame is built in the layout the rewrite
would produce, from the envelope's own `msgspec.to_builtins` and the columns written directly,
and deflated by a copy of one primed compressor. For status and result/2 the bytes are exactly those
of `encode_compact` (tests/test_fleetsim_wire.py compares them over random states). Messages that
carry random float32 data (telemetry's feature statistics, the input of an escalation or a sample)
keep that data out of deflate, in a stored block at the end of the stream (`frame_raw_tail`): the
same message decoded, 5-10% more bytes than the edge sends, half the cost.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import msgspec

from schemas import EscalationRequest, Results, Sample, Status, Telemetry
from schemas.compact import FORMAT_V1, MARKER
from schemas.compact_columns import ABSENT, FLOAT32, NUMBERED, TABLE, to_columns
from schemas.compact_dict import DICT_V1

_HEADER = bytes((MARKER, FORMAT_V1))
_ENCODER = msgspec.msgpack.Encoder()
# As schemas/compact.py: level 6, raw deflate, the preset dictionary. Copying a primed compressor
# gives the same stream as priming a new one.
_PRIMED = zlib.compressobj(6, zlib.DEFLATED, -15, zdict=DICT_V1)
_ABSENT = msgspec.msgpack.Ext(ABSENT, b"")
_STORED = struct.Struct("<BHH")

# One answer waiting for its result/2 message:
# (inference number, label index, edge label index, cloud label index or -1, path, fallback reason
#  or None, confidence, latency ms), the floats already float32-exact as the edge sends them.
Row = tuple[int, int, int, int, str, str | None, float, float]


def frame(body: Any) -> bytes:
    """The compact frame of a body already in the column layout."""
    deflate = _PRIMED.copy()
    return _HEADER + deflate.compress(_ENCODER.encode(body)) + deflate.flush()


def frame_raw_tail(body: bytes, tail: int) -> bytes:
    """The compact frame of a msgpack `body` whose last `tail` bytes are random numbers (tensor data,
    feature statistics): the head deflated as `frame` does, the tail in a stored block.

    Level-6 deflate searches its match chains at every byte of random float32 data and finds
    almost nothing: ~50 ns a byte, most of a telemetry window's cost. Stored, a telemetry frame is
    within a few bytes of the edge's (-6 to +14 of ~750; the head's compression is the same) and
    still one raw deflate stream
    the bridge inflates like any other: the head ends with a sync flush (byte-aligned), then one
    final stored block (header byte 0x01, LEN, NLEN, the bytes)."""
    deflate = _PRIMED.copy()
    cut = len(body) - tail
    head = deflate.compress(body[:cut]) + deflate.flush(zlib.Z_SYNC_FLUSH)
    return _HEADER + head + _STORED.pack(1, tail, tail ^ 0xFFFF) + body[cut:]


def float32(x: float) -> float:
    """`x` rounded to float32, as the edge sends confidences and latencies."""
    value: float = struct.unpack("<f", struct.pack("<f", x))[0]
    return value


def float32_column(values: Sequence[float]) -> msgspec.msgpack.Ext:
    """A column of float32-exact floats (what the rewrite makes of them)."""
    return msgspec.msgpack.Ext(FLOAT32, struct.pack(f"<{len(values)}f", *values))


def numbered(head: str, numbers: Sequence[int]) -> msgspec.msgpack.Ext:
    """A column of `head` + decimal number strings, as deltas (numbers >= 0)."""
    deltas = [numbers[0]] + [b - a for a, b in itertools.pairwise(numbers)]
    return msgspec.msgpack.Ext(NUMBERED, _ENCODER.encode([head, deltas]))


def answers_column(prefix: str, rows: Sequence[Row]) -> Any:
    """The `answers` of a result/2 message in the column layout: a TABLE of the rows (one row stays
    a plain list of one map). A label is the decimal string of its index (the digits models')."""
    if len(rows) == 1:
        return [to_columns(_answer_map(prefix, rows[0]))]
    ids, label, edge, cloud, paths, reasons, confs, lats = zip(*rows, strict=True)
    # The table's keys in the order the rows first show them: every row has the required keys in
    # field order; an optional key the first row lacks comes after, in the order it first appears.
    columns: dict[str, Any] = {
        "inference_id": numbered(prefix, ids),
        "label": numbered("", label),
        "index": list(label),
        "confidence": float32_column(confs),
        "path": list(paths),
    }
    has_reason = [r is not None for r in reasons]
    has_cloud = [c >= 0 for c in cloud]
    later: list[tuple[int, int, str]] = []
    if has_reason[0]:
        columns["fallback_reason"] = _optional(reasons, has_reason, str)
    elif any(has_reason):
        later.append((has_reason.index(True), 0, "fallback_reason"))
    columns["edge_label"] = numbered("", edge)
    if has_cloud[0]:
        columns["cloud_label"] = _optional(cloud, has_cloud, str)
    elif any(has_cloud):
        later.append((has_cloud.index(True), 1, "cloud_label"))
    columns["latency_ms"] = float32_column(lats)
    for _, _, key in sorted(later):
        if key == "fallback_reason":
            columns[key] = _optional(reasons, has_reason, str)
        else:
            columns[key] = _optional(cloud, has_cloud, str)
    return msgspec.msgpack.Ext(TABLE, _ENCODER.encode([len(rows), columns]))


def _optional(values: Sequence[Any], present: list[bool], to_str: Any) -> Any:
    if all(present):
        strings = [to_str(v) for v in values]
        return to_columns(strings)  # labels become NUMBERED, reasons stay a list
    return [to_str(v) if p else _ABSENT for v, p in zip(values, present, strict=True)]


def _answer_map(prefix: str, row: Row) -> dict[str, Any]:
    number, label, edge, cloud, path, reason, conf, lat = row
    out: dict[str, Any] = {
        "inference_id": f"{prefix}{number}",
        "label": str(label),
        "index": label,
        "confidence": conf,
        "path": path,
    }
    if reason is not None:
        out["fallback_reason"] = reason
    out["edge_label"] = str(edge)
    if cloud >= 0:
        out["cloud_label"] = str(cloud)
    out["latency_ms"] = lat
    return out


def results_frame(envelope: Results, prefix: str, rows: Sequence[Row]) -> bytes:
    """A result/2 frame: `envelope` carries every field but the answers (an empty list)."""
    body = msgspec.to_builtins(envelope)
    body["answers"] = answers_column(prefix, rows)
    return frame(body)


def telemetry_frame(window: Telemetry, mean: bytes, std: bytes) -> bytes:
    """A telemetry/1 frame: `window.features` has empty mean/std lists; `mean` and `std` are the
    float32 little-endian bytes of the features' values (at least two of each). The features come
    last in the message, so everything from the means' bytes on goes stored (`frame_raw_tail`)."""
    body = msgspec.to_builtins(window)
    features = body["features"]
    features["mean"] = msgspec.msgpack.Ext(FLOAT32, mean)
    features["std"] = msgspec.msgpack.Ext(FLOAT32, std)
    data = _ENCODER.encode(body)
    return frame_raw_tail(data, len(data) - data.rfind(mean))


def status_frame(status: Status) -> bytes:
    """A status/1 frame: its only list (`accepts`) holds one encoding, which the rewrite leaves."""
    return frame(msgspec.to_builtins(status))


def topic_field(topic: str) -> bytes:
    """A topic as a PUBLISH packet carries it: two bytes of length, then UTF-8."""
    data = topic.encode()
    return struct.pack("!H", len(data)) + data


def _input_last(message: EscalationRequest | Sample) -> tuple[dict[str, Any], int]:
    """The message's builtins with its input tensor moved to the end (a map's order does not
    matter to a reader), and the size of the tensor's data, which then ends the body."""
    body = msgspec.to_builtins(message, builtin_types=(bytes,))
    body["input"] = body.pop("input")
    return body, len(message.input.data)


def escalation_frame(request: EscalationRequest) -> bytes:
    """An escalate/1 frame: no list the rewrite changes (one top-k, a two-int shape); the input's
    random float32 bytes stored (`frame_raw_tail`)."""
    body, tail = _input_last(request)
    return frame_raw_tail(_ENCODER.encode(body), tail)


def sample_frame(sample: Sample) -> bytes:
    """A sample/1 frame: its top-k a table (two or more); the input stored as in `escalation_frame`."""
    body, tail = _input_last(sample)
    body["topk"] = to_columns(body["topk"])
    return frame_raw_tail(_ENCODER.encode(body), tail)


__all__ = [
    "Row",
    "answers_column",
    "escalation_frame",
    "float32",
    "float32_column",
    "frame",
    "frame_raw_tail",
    "numbered",
    "results_frame",
    "sample_frame",
    "status_frame",
    "telemetry_frame",
    "topic_field",
]
