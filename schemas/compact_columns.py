"""The column layout inside a compact frame: lists stored the way they compress.

A results message is a list of answers, each a map with the same ten keys; an escalation or a
sample carries a list of top-k maps; telemetry carries lists of floats. Written row by row, each
answer repeats its keys and interleaves unrelated values, so deflate finds little to share. The
encoder rewrites, losslessly, before msgpack:

    a list of 2+ maps        -> TABLE:    [n, {key: [value of each row]}]; a key a row lacks is ABSENT
    a list of 2+ floats that -> FLOAT32:  their little-endian float32 bytes (4 bytes, not 9); only
      float32 holds exactly              when every value survives the round trip exactly
    a list of 2+ strings that -> NUMBERED: [head, first number, deltas...] ("b0224ac6-193",
      share a head before a               "b0224ac6-194", ... -> "b0224ac6-", 193, 1, ...): ids
      decimal number                      counted up cost a byte each instead of a dozen

Each rewrite is a msgpack extension type, so the decoder restores the plain lists while it parses
(`ext_hook`) and the typed message is validated from them exactly as from JSON. A list that fits
no rewrite is left alone: the layout never changes a value, only how it is written.
"""

from __future__ import annotations

import itertools
import re
import struct
from typing import Any

import msgspec

TABLE = 1
ABSENT = 2
FLOAT32 = 3
NUMBERED = 4

_ENCODER = msgspec.msgpack.Encoder()
# What one rewritten list may expand to when read back: far above any list the schemas allow
# (1,024 answers of 128-character ids), far below what a crafted frame could otherwise ask for.
MAX_ROWS = 1 << 16
MAX_EXPANDED_BYTES = 4 << 20
_ABSENT = msgspec.msgpack.Ext(ABSENT, b"")
# A head, then a decimal number without leading zeros (so that str(int(digits)) == digits).
_NUMBERED = re.compile(r"(.*?)(0|[1-9][0-9]{0,17})\Z", re.DOTALL)


class _Missing:
    """Marks a key a row of a TABLE did not have (decoding only)."""


MISSING = _Missing()


def to_columns(value: Any) -> Any:
    """`value` (msgspec builtins) with its lists rewritten (see the module docstring)."""
    if isinstance(value, dict):
        return {k: to_columns(v) for k, v in value.items()}
    if isinstance(value, list):
        if len(value) < 2:
            return [to_columns(v) for v in value]
        first = value[0]
        if isinstance(first, dict) and all(isinstance(v, dict) for v in value):
            return _table(value)
        if isinstance(first, float) and all(type(v) is float for v in value):
            packed = _float32(value)
            if packed is not None:
                return packed
        elif isinstance(first, str) and all(isinstance(v, str) for v in value):
            numbered = _numbered(value)
            if numbered is not None:
                return numbered
        return [to_columns(v) for v in value]
    return value


def _table(rows: list[dict[str, Any]]) -> msgspec.msgpack.Ext:
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    columns = {k: to_columns([row.get(k, _ABSENT) for row in rows]) for k in keys}
    return msgspec.msgpack.Ext(TABLE, _ENCODER.encode([len(rows), columns]))


def _float32(values: list[float]) -> msgspec.msgpack.Ext | None:
    try:
        packed = struct.pack(f"<{len(values)}f", *values)
    except OverflowError:
        return None
    if list(struct.unpack(f"<{len(values)}f", packed)) != values:
        return None  # some value needs float64 (or is a NaN, which never compares equal)
    return msgspec.msgpack.Ext(FLOAT32, packed)


def _numbered(values: list[str]) -> msgspec.msgpack.Ext | None:
    head: str | None = None
    numbers: list[int] = []
    for text in values:
        match = _NUMBERED.match(text)
        if match is None or (head is not None and match[1] != head):
            return None
        head = match[1]
        numbers.append(int(match[2]))
    deltas = [numbers[0]] + [b - a for a, b in itertools.pairwise(numbers)]
    return msgspec.msgpack.Ext(NUMBERED, _ENCODER.encode([head, deltas]))


def ext_hook(code: int, data: memoryview) -> Any:
    """The msgpack decoder's hook: each rewrite back to its plain list."""
    if code == ABSENT:
        return MISSING
    if code == FLOAT32:
        if len(data) % 4:
            raise ValueError("float32 column of a length not a multiple of 4")
        return list(struct.unpack(f"<{len(data) // 4}f", data))
    if code == TABLE:
        return _rows(_DECODER.decode(data))
    if code == NUMBERED:
        return _strings(_DECODER.decode(data))
    raise ValueError(f"unknown extension type {code}")


def _rows(body: Any) -> list[dict[str, Any]]:
    if not (isinstance(body, list) and len(body) == 2 and isinstance(body[0], int) and isinstance(body[1], dict)):
        raise ValueError("malformed table")
    n, columns = body
    if not 0 <= n <= MAX_ROWS:
        raise ValueError(f"table of {n} rows (at most {MAX_ROWS})")
    for key, column in columns.items():
        if not isinstance(column, list) or len(column) != n:
            raise ValueError(f"table column {key!r} does not have {n} values")
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, column in columns.items():
        for row, v in zip(rows, column, strict=True):
            if v is not MISSING:
                row[key] = v
    return rows


def _strings(body: Any) -> list[str]:
    if not (isinstance(body, list) and len(body) == 2 and isinstance(body[0], str) and isinstance(body[1], list)):
        raise ValueError("malformed numbered strings")
    head, deltas = body
    if (len(head) + 20) * len(deltas) > MAX_EXPANDED_BYTES:
        raise ValueError(f"numbered strings expand past {MAX_EXPANDED_BYTES} bytes")
    out: list[str] = []
    number = 0
    for delta in deltas:
        if not isinstance(delta, int):
            raise ValueError("numbered strings with a delta that is not an integer")
        number += delta
        if number < 0:
            raise ValueError("numbered strings with a negative number")
        out.append(f"{head}{number}")
    return out


_DECODER: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(ext_hook=ext_hook)


def from_columns(raw: bytes) -> Any:
    """The builtins of a msgpack body written with `to_columns` (a MISSING left over is an error)."""
    return _DECODER.decode(raw)


__all__ = ["from_columns", "to_columns"]
