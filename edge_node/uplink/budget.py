"""What the link costs, per channel, and the daily byte budget the node spends by priority.

Counting: every MQTT packet the connection sends or receives is booked to the channel of its
topic (results, telemetry, escalate, ...; PUBACKs to the channel they
acknowledge; CONNECT, SUBSCRIBE and their answers to "protocol"), by its size on the wire as MQTT
encodes it: fixed header, topic or alias, packet id, properties and payload. That is what a TCP
counting proxy sees (bench/uplink.py checks it), and what an LTE plan bills, less the IP/TCP (and
TLS) headers, which the node cannot see; keepalive pings (2+2 bytes per idle keepalive interval)
are not booked either.

Channels are named as schemas.Channel names them ("results", "escalate/reply", ...).

The budget ([uplink] daily_bytes) is a bucket of bytes refilled at daily_bytes per day, holding at
most `burst_s` worth (half an hour): over any day the node spends at most daily_bytes plus that
half hour (+2%), and when it has more to send than the budget it spends all of it. Each kind of
message may spend only while the bucket, less what already waits in the outbox, is above its
reserve: control messages always, telemetry down to empty, escalations down to a quarter, samples
to half, results to three quarters. So under pressure results go first, then samples, then
escalations, and the reserve keeps telemetry flowing. What is held back is counted (answers as
"summarised": the telemetry window still counts them; samples and escalations as skipped; a
telemetry window held back grows into the next one), and telemetry reports the counts.
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from schemas import Channel
from schemas.topics import MODELS

DAY_S = 86_400.0


class Spend(enum.IntEnum):
    """What may be held back when the budget runs low, most important first."""

    CONTROL = 0  # status, acks, clock, model requests: never held
    TELEMETRY = 1
    ESCALATIONS = 2
    SAMPLES = 3
    RESULTS = 4


# The share of the bucket each kind leaves for the kinds before it.
RESERVE: dict[Spend, float] = {
    Spend.CONTROL: float("-inf"),
    Spend.TELEMETRY: 0.0,
    Spend.ESCALATIONS: 0.25,
    Spend.SAMPLES: 0.5,
    Spend.RESULTS: 0.75,
}

PROTOCOL = "protocol"  # CONNECT/CONNACK, SUBSCRIBE/SUBACK, DISCONNECT


_TWO_LEVELS = frozenset(c.value for c in Channel if "/" in c.value)


def channel_of(topic: str) -> str:
    """The channel a topic belongs to: a device channel (schemas.Channel, e.g. "results" or
    "escalate/reply"), "models" for model chunks, or the last topic level."""
    head, _, last = topic.rpartition("/")
    two = f"{head.rpartition('/')[2]}/{last}"
    if two in _TWO_LEVELS:
        return two
    if head.endswith("/" + MODELS):
        return MODELS
    return last or PROTOCOL


def varint_size(n: int) -> int:
    """Bytes of an MQTT variable byte integer."""
    size = 1
    while n >= 128:
        n >>= 7
        size += 1
    return size


def publish_size(topic_bytes: int, payload_bytes: int, qos: int, properties_bytes: int | None) -> int:
    """Bytes of a PUBLISH on the wire; `properties_bytes` is None for MQTT 3.1.1, else the size of
    the packed properties including their length (1 for none)."""
    remaining = 2 + topic_bytes + (2 if qos > 0 else 0) + payload_bytes + (properties_bytes or 0)
    return 1 + varint_size(remaining) + remaining


def connect_size(fields: list[bytes], properties_bytes: int) -> int:
    """Bytes of a CONNECT: its 10-byte variable header, each payload field (client id, will topic
    and payload, user name, password) with its 2-byte length, and the MQTT 5 properties."""
    size = 10 + sum(2 + len(f) for f in fields) + properties_bytes
    return 1 + varint_size(size) + size


ACK_SIZE = 4  # PUBACK with reason "success" (MQTT 5 omits the reason code and properties then)


@dataclass(frozen=True, slots=True)
class LinkCounts:
    """Bytes up and down per channel, units held back per channel, and the budget left (None
    without a budget), since the previous `take`."""

    up: dict[str, int]
    down: dict[str, int]
    held: dict[str, int]
    left: int | None


@dataclass
class ByteBudget:
    """The link's byte counts and the daily budget (see the module docstring); `daily_bytes` 0
    counts without limiting. `pending` returns the bytes queued in the outbox, not yet sent."""

    daily_bytes: int = 0
    clock: Callable[[], float] = time.monotonic
    burst_s: float = 1800.0
    pending: Callable[[], int] = lambda: 0
    up: Counter[str] = field(default_factory=Counter)
    down: Counter[str] = field(default_factory=Counter)
    held: Counter[str] = field(default_factory=Counter)
    _level: float = field(default=0.0, repr=False)
    _last: float | None = field(default=None, repr=False)
    _reported: tuple[Counter[str], Counter[str], Counter[str]] = field(
        default_factory=lambda: (Counter(), Counter(), Counter()), repr=False
    )

    def __post_init__(self) -> None:
        if self.daily_bytes < 0:
            raise ValueError("daily_bytes must be >= 0 (0: no budget)")
        self._level = self.capacity

    @property
    def limited(self) -> bool:
        return self.daily_bytes > 0

    @property
    def capacity(self) -> float:
        return self.daily_bytes / DAY_S * self.burst_s

    def level(self) -> float:
        """Bytes the bucket holds now (negative after control messages overspent it)."""
        now = self.clock()
        if self._last is not None:
            rate = self.daily_bytes / DAY_S
            self._level = min(self.capacity, self._level + max(0.0, now - self._last) * rate)
        self._last = now
        return self._level

    def allows(self, spend: Spend) -> bool:
        """May a message of this kind be queued now?"""
        if not self.limited or spend is Spend.CONTROL:
            return True
        return self.level() - self.pending() >= RESERVE[spend] * self.capacity

    def hold(self, channel: str, count: int = 1) -> None:
        """Count `count` units of `channel` held back by the budget."""
        self.held[channel] += count

    def sent(self, channel: str, nbytes: int) -> None:
        self.up[channel] += nbytes
        if self.limited:
            self.level()
            self._level -= nbytes

    def received(self, channel: str, nbytes: int) -> None:
        # Downlink bytes are billed too, and the node cannot refuse them: they spend the budget.
        self.down[channel] += nbytes
        if self.limited:
            self.level()
            self._level -= nbytes

    def take(self) -> LinkCounts:
        """The counts since the previous call."""
        up0, down0, held0 = self._reported
        counts = LinkCounts(
            up=_delta(self.up, up0),
            down=_delta(self.down, down0),
            held=_delta(self.held, held0),
            left=max(0, int(self.level())) if self.limited else None,
        )
        self._reported = (Counter(self.up), Counter(self.down), Counter(self.held))
        return counts


def _delta(now: Counter[str], before: Counter[str]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}
