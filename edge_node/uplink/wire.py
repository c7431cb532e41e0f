"""How a typed message becomes what the outbox stores: the one place a device encodes a payload.

Every producer (routing's answers, samples and escalations, telemetry, status, command acks)
hands its message to `Wire.out`, which puts it on its channel's topic, numbers it with the outbox's
`seq` when the cloud is to confirm it, and encodes it. Messages the cloud stores are confirmed;
messages that are answered (escalations, clock requests) or only useful for a moment are done on
the broker's PUBACK.

Encoding ([uplink] encoding): JSON, or the compact encoding (schemas/compact.py), which costs a
tenth of the bytes on the link. With "auto" the node writes JSON until a cloud bridge's clock
reply says it reads compact (an older bridge would dead-letter it), and compact from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal, Protocol

from edge_node.config import EdgeConfig
from edge_node.uplink.budget import ByteBudget
from edge_node.uplink.message import OutMessage, Priority
from schemas import Channel, Envelope, Topics, encode
from schemas.compact import ENCODING, encode_compact

log = logging.getLogger(__name__)

# What the bridge stores durably and confirms (confirm/1).
CONFIRMED = frozenset({Channel.STATUS, Channel.TELEMETRY, Channel.RESULTS, Channel.SAMPLES, Channel.CMD_ACK})


class Sequenced(Protocol):
    """The outbox's numbering (Outbox.next_seq)."""

    def next_seq(self) -> int: ...


class Wire:
    """Encodes one device's messages for its topics (see the module docstring)."""

    def __init__(
        self,
        topics: Topics,
        fleet_id: str,
        device_id: str,
        seqs: Sequenced | None,
        encoding: Literal["auto", "json", "compact"] = "json",
        budget: ByteBudget | None = None,
    ) -> None:
        """`seqs`: the outbox that numbers confirmed messages, or None when delivery is "broker".
        `budget`: the link's byte counts and daily budget, which producers ask before they queue."""
        self._seqs = seqs
        self.budget = budget if budget is not None else ByteBudget()
        self.encoding = encoding
        self.compact = encoding == "compact"
        self.topic = {channel: topics.device(fleet_id, device_id, channel) for channel in Channel}

    @property
    def accepts(self) -> list[str]:
        """The encodings this node reads besides JSON (status/1 `accepts`)."""
        return [] if self.encoding == "json" else [ENCODING]

    def cloud_reads(self, encodings: Iterable[str]) -> None:
        """A bridge said which encodings it reads: with "auto", switch to compact if it reads it."""
        if self.encoding == "auto" and not self.compact and ENCODING in encodings:
            self.compact = True
            log.info("uplink encoding compact (%s): the cloud reads it", ENCODING)

    @property
    def confirmed(self) -> bool:
        return self._seqs is not None

    def out(self, channel: Channel, message: Envelope, priority: Priority, **options: Any) -> OutMessage:
        """The outbox message for `message` on `channel` (options: expires_at, retain, response
        topic, correlation data, ...). `message.seq` is set here when the cloud is to confirm it."""
        if self._seqs is not None and channel in CONFIRMED:
            message.seq = self._seqs.next_seq()
        payload = encode_compact(message) if self.compact else encode(message)
        return OutMessage(
            topic=self.topic[channel],
            payload=payload,
            priority=priority,
            msg_id=message.msg_id,
            seq=message.seq,
            **options,
        )


def device_wire(config: EdgeConfig, outbox: Sequenced, budget: ByteBudget | None = None) -> Wire:
    """The wire of the configured device: confirmed messages numbered by `outbox` unless
    `[outbox] delivery = "broker"`."""
    dev = config.device
    seqs = outbox if config.outbox.delivery == "confirmed" else None
    return Wire(config.topics, dev.fleet_id, dev.device_id, seqs, config.uplink.encoding, budget)
