"""How a typed message becomes what the outbox stores: the one place a device encodes a payload.

Every producer (routing's answers, samples and escalations, telemetry, status, command acks)
hands its message to `Wire.out`, which puts it on its channel's topic, numbers it with the outbox's
`seq` when the cloud is to confirm it, and encodes it. Messages the cloud stores are confirmed;
messages that are answered (escalations, clock requests) or only useful for a moment are done on
the broker's PUBACK.
"""

from __future__ import annotations

from typing import Any, Protocol

from edge_node.config import EdgeConfig
from edge_node.uplink.message import OutMessage, Priority
from schemas import Channel, Envelope, Topics, encode

# What the bridge stores durably and confirms (confirm/1).
CONFIRMED = frozenset({Channel.STATUS, Channel.TELEMETRY, Channel.RESULTS, Channel.SAMPLES, Channel.CMD_ACK})


class Sequenced(Protocol):
    """The outbox's numbering (Outbox.next_seq)."""

    def next_seq(self) -> int: ...


class Wire:
    """Encodes one device's messages for its topics (see the module docstring)."""

    def __init__(self, topics: Topics, fleet_id: str, device_id: str, seqs: Sequenced | None) -> None:
        """`seqs`: the outbox that numbers confirmed messages, or None when delivery is "broker"."""
        self._seqs = seqs
        self.topic = {channel: topics.device(fleet_id, device_id, channel) for channel in Channel}

    @property
    def confirmed(self) -> bool:
        return self._seqs is not None

    def out(self, channel: Channel, message: Envelope, priority: Priority, **options: Any) -> OutMessage:
        """The outbox message for `message` on `channel` (options: expires_at, retain, response
        topic, correlation data, ...). `message.seq` is set here when the cloud is to confirm it."""
        if self._seqs is not None and channel in CONFIRMED:
            message.seq = self._seqs.next_seq()
        return OutMessage(
            topic=self.topic[channel],
            payload=encode(message),
            priority=priority,
            msg_id=message.msg_id,
            seq=message.seq,
            **options,
        )


def device_wire(config: EdgeConfig, outbox: Sequenced) -> Wire:
    """The wire of the configured device: confirmed messages numbered by `outbox` unless
    `[outbox] delivery = "broker"`."""
    dev = config.device
    return Wire(config.topics, dev.fleet_id, dev.device_id, outbox if config.outbox.delivery == "confirmed" else None)
