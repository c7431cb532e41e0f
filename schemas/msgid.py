"""Unique, time-ordered message ids (UUID version 7, RFC 9562).

Each id starts with the creation time in milliseconds followed by 12 bits of sub-millisecond
time (RFC 9562 method 3), so ids sort by creation time to about a quarter of a microsecond;
the remaining 62 bits are random, so ids minted on different devices never collide. Receivers
deduplicate by id (a message re-sent after a lost PUBACK keeps its id).
"""

from __future__ import annotations

import os
import time
import uuid

MSG_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"


_RAND_MASK = (1 << 62) - 1


def _format(ns: int, rand: int) -> str:
    ms, rest_ns = divmod(ns, 1_000_000)
    sub_ms = rest_ns * 4096 // 1_000_000
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | sub_ms << 64 | 0b10 << 62 | (rand & _RAND_MASK)
    h = f"{value:032x}"
    # Formatting by hand: uuid.UUID(int=...) costs several microseconds per id on the hot path.
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_msg_id(now_ns: int | None = None) -> str:
    """Return a new UUIDv7 string; `now_ns` (unix time in ns) is for tests."""
    ns = time.time_ns() if now_ns is None else now_ns
    return _format(ns, int.from_bytes(os.urandom(8), "big"))


def msg_id_time(msg_id: str) -> float:
    """Unix time in seconds encoded in a UUIDv7 message id (millisecond precision)."""
    return (uuid.UUID(msg_id).int >> 80) / 1000.0
