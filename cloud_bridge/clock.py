"""The cloud's time for devices: answers clock/1 requests, so a device can estimate its offset.

A device asks on every connect and then hourly (edge_node/uplink/clock.py). The reply carries when
the request arrived and, as its `ts`, when the reply left; with its own send and receive times the
device computes the offset NTP's way. Requests are taken from a shared subscription like the other
device channels (any bridge may answer), acked at once (an old answer measures nothing, so a
request is never worth redelivering), and answered QoS 1 with a short expiry on the
device's clock/reply topic (with the request's Correlation Data under MQTT 5).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cloud_bridge.errors import MqttError
from cloud_bridge.mqtt import Incoming
from schemas.codec import decode, encode
from schemas.errors import DecodeError
from schemas.messages import ClockReply, ClockRequest
from schemas.msgid import new_msg_id
from schemas.topics import Channel, Topics

log = logging.getLogger(__name__)

CLOCK_SUFFIX = "/" + Channel.CLOCK.value
REPLY_EXPIRY_S = 30
Publish = Callable[[str, bytes, int, bytes | None, int | None], Awaitable[None]]


def clock_filter(topics: Topics, share_group: str, shared: bool) -> str:
    topic_filter = topics.filter(Channel.CLOCK)
    return Topics.shared(share_group, topic_filter) if shared else topic_filter


@dataclass
class ClockStats:
    answered: int = 0
    invalid: int = 0
    failed: int = 0


class ClockServer:
    """Answers clock requests as they arrive (each costs a decode and a publish)."""

    def __init__(self, topics: Topics, publish: Publish, ack: Callable[[Incoming], bool]) -> None:
        self._topics = topics
        self._publish = publish
        self._ack = ack
        self.stats = ClockStats()

    async def answer(self, incoming: Incoming) -> None:
        received = time.time()
        self._ack(incoming)
        try:
            request = decode(incoming.payload, ClockRequest)
        except DecodeError as exc:
            self.stats.invalid += 1
            log.warning("bad clock request topic=%s error=%s", incoming.topic, exc)
            return
        reply = ClockReply(
            msg_id=new_msg_id(),
            fleet_id=request.fleet_id,
            device_id=request.device_id,
            ts=time.time(),
            request_id=request.msg_id,
            request_ts=request.ts,
            received=received,
        )
        # Always the device's own reply topic, whatever Response Topic it named: a device must not be
        # able to make the bridge publish anywhere else.
        topic = self._topics.device(request.fleet_id, request.device_id, Channel.CLOCK_REPLY)
        try:
            await self._publish(topic, encode(reply), 1, incoming.correlation_data, REPLY_EXPIRY_S)
        except MqttError as exc:
            self.stats.failed += 1
            log.warning("clock reply not published device=%s/%s error=%s", request.fleet_id, request.device_id, exc)
            return
        self.stats.answered += 1
