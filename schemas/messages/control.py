"""Control traffic between a device and the cloud: delivery confirmations and the clock exchange.

A device deletes a message from its outbox when the cloud confirms it stored it (confirm/1), not
when a broker acknowledged it: a broker can lose what it acknowledged (a restart that forgets a
shared subscription, a gateway's full queue). The bridge confirms in batches, by ranges of the
outbox sequence numbers (`seq`) the messages carried, and names the outbox by its epoch.

clock/1 is a request/response (MQTT 5 Response Topic + Correlation Data, or the device's
clock/reply topic with `request_id` under 3.1.1): with the device's send and receive times and the
bridge's receive and send times, the device estimates its clock offset the way NTP does.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from schemas.messages.base import Envelope, Epoch, MsgId, Seq, Ts

SeqRange = Annotated[list[Seq], Meta(min_length=2, max_length=2, description="first and last seq, inclusive")]


class Confirm(Envelope, kw_only=True, tag="confirm/1"):
    """The messages of one device's outbox that the cloud has durably stored (or dead-lettered)."""

    epoch: Epoch
    ranges: Annotated[list[SeqRange], Meta(min_length=1, max_length=4096)]


class ClockRequest(Envelope, kw_only=True, tag="clock/1"):
    """A device asks for the cloud's time; `ts` is when it sent this (device clock)."""


class ClockReply(Envelope, kw_only=True, tag="clock_reply/1"):
    """The cloud's time: `received` when the request arrived, `ts` when this reply left (cloud clock)."""

    request_id: MsgId
    request_ts: Ts
    received: Ts
