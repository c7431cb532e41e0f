"""The message model the rest of the edge builds: an outbound message, its priority class and the
stored row the outbox hands to the link; and the message the link hands in from the broker.

Priorities order the replay (CONTROL first) and decide who may be evicted for whom (see
`edge_node/uplink/outbox/index.py`); `message_size` is what the outbox's `max_bytes` bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Priority(IntEnum):
    """Replay order of the outbox: lower value first, oldest first within a class."""

    CONTROL = 0
    ESCALATION = 1
    TELEMETRY = 2
    RESULTS = 3
    SAMPLES = 4


@dataclass(slots=True)
class OutMessage:
    """One outbound MQTT message. `expires_at` is unix seconds: past it the row is dropped, not sent.

    Treat it as immutable (use `dataclasses.replace`). It is not declared frozen because a frozen
    dataclass sets each field through `object.__setattr__`: ~6x the construction cost, paid for
    every result, sample and telemetry message on the pipeline's hot path.
    """

    topic: str
    payload: bytes
    priority: Priority
    msg_id: str
    qos: int = 1
    retain: bool = False
    expires_at: float | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    response_topic: str | None = None
    correlation_data: bytes | None = None
    content_type: str | None = None
    # The outbox sequence number inside the payload of a message the cloud confirms (confirm/1);
    # None for messages that are done on the broker's PUBACK (escalations, clock requests, ...).
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class Stored:
    """A row handed out by `Outbox.take`: ack it with `row_id` once the broker acknowledged it."""

    row_id: int
    msg: OutMessage


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """A message received from the broker (commands, escalation replies, inputs)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    message_expiry: int | None = None


def message_size(msg: OutMessage) -> int:
    """The bytes a message counts against the outbox's `max_bytes`: topic plus payload."""
    return len(msg.topic.encode()) + len(msg.payload)
