"""The compact encoding (schemas/compact.py, compact_columns.py): lossless, smaller, and a bad frame
is a DecodeError that says what is wrong, never another exception."""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import msgspec
import pytest

from schemas import DecodeError, Envelope, decode, decode_for_topic, encode
from schemas.compact import MARKER, encode_compact, is_compact
from schemas.compact_columns import ABSENT, FLOAT32, NUMBERED, TABLE, from_columns, to_columns
from schemas.compact_dict import DICT_V1, SHA256_V1
from schemas.messages import Answer, ModelRef, Results
from schemas.topics import Topics
from tests.factories import examples

MODEL = ModelRef(name="digits-edge", version="1.0.0", sha256="ab" * 32)


def _frame(body: bytes) -> bytes:
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15, zdict=DICT_V1)
    return bytes((MARKER, 1)) + deflate.compress(body) + deflate.flush()


def _results(n: int) -> Results:
    answers = [
        Answer(
            inference_id=f"b0224ac6-{100 + i}",
            label=str(i % 10),
            index=i % 10,
            confidence=float(msgspec.json.decode(b"0.75")) if i % 3 else 0.5,
            path="edge" if i % 5 else "edge_fallback",
            fallback_reason=None if i % 5 else "timeout",
            edge_label=str(i % 10),
            latency_ms=0.5 + i,
            source_ref=f"replay:{99 + i}",
            truth=str((i + 1) % 10) if i % 7 == 0 else None,
        )
        for i in range(n)
    ]
    return Results(
        msg_id="01a24a12-a6e2-775e-a353-d596f76cbde4",
        fleet_id="f1",
        device_id="d1",
        ts=1.5e9,
        model=MODEL,
        answers=answers,
    )


def test_the_preset_dictionary_is_frozen() -> None:
    """Both ends deflate against these bytes: an edit would make every frame unreadable."""
    assert hashlib.sha256(DICT_V1).hexdigest() == SHA256_V1


@pytest.mark.parametrize("message", examples(), ids=lambda m: type(m).__name__)
def test_every_message_type_reads_back_equal_from_a_compact_frame(message: Envelope) -> None:
    frame = encode_compact(message)
    assert is_compact(frame) and frame[0] == MARKER
    assert decode(frame, type(message)) == message
    # ... and the same message as JSON is read by the same function (one topic, two encodings).
    assert decode(encode(message), type(message)) == message


def test_a_results_message_is_written_in_columns_and_costs_a_fraction_of_json() -> None:
    message = _results(64)
    frame = encode_compact(message)
    assert decode_for_topic(Topics(), "fleet/f1/d1/results", frame) == message
    # Deterministic byte counts, not timings: the layout is what keeps each answer to a few bytes.
    row_layout = _frame(msgspec.msgpack.encode(message))
    assert len(frame) < 0.7 * len(row_layout)
    assert len(frame) < len(encode(message)) / 8


def test_the_column_layout_is_lossless_for_what_it_rewrites() -> None:
    value: dict[str, Any] = {
        "rows": [{"a": 1, "b": "x"}, {"a": 2}, {"b": None, "c": [0.5, 0.25]}],
        "f32": [0.5, 1.25, -3.0],
        "f64": [0.1, 0.2],  # not float32-exact: stays float64
        "ts": [1.7e9 + 0.123456, 1.7e9],
        "ids": ["dev-9", "dev-10", "dev-7", "dev-0"],
        "zeros": ["x-05", "x-5"],  # a leading zero is part of the head: no numbering
        "labels": ["7", "3", "8"],
        "one": [{"a": 1}],
        "empty": [],
        "nan": [float("inf"), 1.0],
    }
    packed = msgspec.msgpack.encode(to_columns(value))
    assert from_columns(packed) == value
    kinds = {
        key: type(to_columns(v)).__name__ if not isinstance(to_columns(v), msgspec.msgpack.Ext) else to_columns(v).code
        for key, v in value.items()
    }
    assert kinds["rows"] == TABLE and kinds["f32"] == FLOAT32 and kinds["ids"] == NUMBERED
    assert kinds["labels"] == NUMBERED and kinds["f64"] == "list" and kinds["zeros"] == "list"


def _ext(code: int, body: Any) -> msgspec.msgpack.Ext:
    data = body if isinstance(body, bytes) else msgspec.msgpack.encode(body)
    return msgspec.msgpack.Ext(code, data)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xc1\x01garbage", "malformed"),
        ({"schema": "result/2", "answers": _ext(TABLE, [1 << 40, {}])}, "rows"),
        ({"schema": "result/2", "answers": _ext(TABLE, [3, {"a": [1, 2]}])}, "does not have 3 values"),
        ({"schema": "result/2", "answers": _ext(NUMBERED, ["x" * 100_000, [1] * 1000])}, "expand past"),
        ({"schema": "result/2", "answers": _ext(NUMBERED, ["x", [1, -5]])}, "negative"),
        ({"schema": "result/2", "answers": _ext(FLOAT32, b"\x00\x00\x00")}, "multiple of 4"),
        ({"schema": "result/2", "answers": _ext(9, b"")}, "unknown extension"),
        ({"schema": "result/2", "msg_id": _ext(ABSENT, b"")}, "msg_id"),
    ],
)
def test_a_bad_frame_is_a_decode_error_that_says_what(body: Any, reason: str) -> None:
    raw = body if isinstance(body, bytes) else msgspec.msgpack.encode(body)
    with pytest.raises(DecodeError, match=reason):
        decode_for_topic(Topics(), "fleet/f1/d1/results", _frame(raw))


def test_a_truncated_or_future_frame_is_refused() -> None:
    frame = encode_compact(_results(3))
    with pytest.raises(DecodeError, match=r"truncated|malformed"):
        decode_for_topic(Topics(), "fleet/f1/d1/results", frame[:-4])
    with pytest.raises(DecodeError, match="unknown format 2"):
        decode_for_topic(Topics(), "fleet/f1/d1/results", bytes((MARKER, 2)) + frame[2:])


def test_a_frame_that_inflates_past_the_limit_is_refused() -> None:
    """A deflate bomb: a few hundred bytes that would unpack to megabytes."""
    body = msgspec.msgpack.encode({"schema": "result/2", "pad": b"\x00" * (8 << 20)})
    frame = _frame(body)
    assert len(frame) < 20_000
    with pytest.raises(DecodeError, match="more than the limit"):
        decode_for_topic(Topics(), "fleet/f1/d1/results", frame)
