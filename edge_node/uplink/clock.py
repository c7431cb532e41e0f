"""The device's clock offset from the cloud's, estimated from clock/1 round trips.

Device clocks drift or were never set (no RTC, no NTP behind a gateway): a telemetry window dated a
day ahead once switched drift scoring off for a day. The node asks a cloud bridge for its time on
every connect, again after RETRY_S while unanswered, and then every INTERVAL_S. With the four
times of a round trip (device send t0, cloud receive t1, cloud send t2, device receive t3) the
offset is NTP's ((t1 - t0) + (t2 - t3)) / 2, and the exchange with the shortest round trip of the
last few is the one trusted (queueing delays only ever lengthen a trip). Telemetry reports it as
`clock_offset_s`: device minus cloud.

Requests are CONTROL messages through the outbox like everything else, done on PUBACK (not
confirmed) and dropped if not sent within REQUEST_TTL_S: an old request measures nothing.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

from edge_node.uplink.message import OutMessage, Priority
from edge_node.uplink.wire import Wire
from schemas import Channel, ClockReply, ClockRequest, new_msg_id

INTERVAL_S = 3600.0
REQUEST_TTL_S = 30.0
RETRY_S = 30.0  # a request unanswered this long (the bridge was away) is asked again
_KEEP = 8  # round trips remembered; the shortest one sets the estimate
_PENDING = 16  # requests awaiting replies (older ones are forgotten)


class ClockSync:
    """Builds clock requests and turns replies into the device's offset estimate."""

    def __init__(self, wire: Wire, fleet_id: str, device_id: str) -> None:
        self._wire = wire
        self._fleet_id, self._device_id = fleet_id, device_id
        self._pending: OrderedDict[str, float] = OrderedDict()  # request msg_id -> t0
        self._trips: deque[tuple[float, float]] = deque(maxlen=_KEEP)  # (round trip s, offset s)
        self.replies = 0
        self._asked_at = 0.0  # monotonic time of the latest request
        self._answered_at = 0.0  # monotonic time of the latest reply

    def due(self) -> bool:
        """Whether to ask again now: the last request went unanswered for RETRY_S, or the last answer
        is INTERVAL_S old."""
        now = time.monotonic()
        if self._answered_at < self._asked_at:
            return now - self._asked_at >= RETRY_S
        return now - self._answered_at >= INTERVAL_S

    def request(self) -> OutMessage:
        self._asked_at = time.monotonic()
        now = time.time()
        request = ClockRequest(msg_id=new_msg_id(), fleet_id=self._fleet_id, device_id=self._device_id, ts=now)
        self._pending[request.msg_id] = now
        while len(self._pending) > _PENDING:
            self._pending.popitem(last=False)
        return self._wire.out(
            Channel.CLOCK,
            request,
            Priority.CONTROL,
            expires_at=now + REQUEST_TTL_S,
            response_topic=self._wire.topic[Channel.CLOCK_REPLY],
            correlation_data=request.msg_id.encode(),
        )

    def on_reply(self, reply: ClockReply, received: float | None = None) -> bool:
        """Take in a reply (`received`: local time it arrived); False if it answers no request of ours."""
        t0 = self._pending.pop(reply.request_id, None)
        if t0 is None:
            return False
        t3 = time.time() if received is None else received
        t1, t2 = reply.received, reply.ts
        trip = max((t3 - t0) - (t2 - t1), 0.0)
        cloud_minus_device = ((t1 - t0) + (t2 - t3)) / 2.0
        self._trips.append((trip, -cloud_minus_device))
        self.replies += 1
        self._answered_at = time.monotonic()
        return True

    @property
    def offset_s(self) -> float | None:
        """This device's clock minus the cloud's, from the shortest recent round trip (None: no reply yet)."""
        if not self._trips:
            return None
        return min(self._trips)[1]
