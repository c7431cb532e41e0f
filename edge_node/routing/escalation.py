"""Outstanding escalations: requests sent to the cloud model, awaiting a reply or their deadline.

The number of outstanding requests is bounded (`max_outstanding`): while the cloud is slow, an
unsure input that finds no free slot is answered locally ("shed") instead of queueing memory.
Replies are matched by request id (MQTT 5 correlation data and the payload's `request_id` carry
the same value, so the 3.1.1 fallback matches the same way).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Literal

from schemas import EscalationReply

log = logging.getLogger(__name__)

Outcome = Literal["answered", "timeout", "offline", "shed", "error"]


@dataclass(frozen=True, slots=True)
class EscalationResult:
    outcome: Outcome
    reply: EscalationReply | None = None


class Escalations:
    def __init__(self, max_outstanding: int) -> None:
        self.max_outstanding = max_outstanding
        # Event-loop time until which nothing is escalated: a reply's pause_s (the cloud found,
        # on labeled samples, that its model does not answer this device's inputs better).
        self.paused_until = 0.0
        self._pending: dict[str, asyncio.Future[EscalationReply]] = {}
        self.late_replies = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def reserve(self, request_id: str) -> asyncio.Future[EscalationReply] | None:
        """A future for the reply, or None when the bound is reached (the caller falls back)."""
        if len(self._pending) >= self.max_outstanding:
            return None
        future: asyncio.Future[EscalationReply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._idle.clear()
        return future

    async def wait(self, request_id: str, future: asyncio.Future[EscalationReply], deadline: float) -> EscalationResult:
        """Await the reply until `deadline` (event-loop time)."""
        try:
            async with asyncio.timeout_at(deadline):
                reply = await future
        except TimeoutError:
            return EscalationResult("timeout")
        finally:
            self._release(request_id)
        if reply.error is not None or reply.label is None:
            log.warning("escalation %s answered with error: %s", request_id, reply.error)
            return EscalationResult("error", reply)
        return EscalationResult("answered", reply)

    def cancel(self, request_id: str) -> None:
        """Forget a reservation whose request was never sent."""
        future = self._pending.get(request_id)
        if future is not None and not future.done():
            future.cancel()
        self._release(request_id)

    def resolve(self, reply: EscalationReply) -> bool:
        """Deliver a reply; False (and counted) if nobody waits for it any more."""
        if reply.pause_s:
            until = asyncio.get_running_loop().time() + reply.pause_s
            if until > self.paused_until + 1.0:
                log.info("escalations paused for %.0f s: the cloud model does not help here", reply.pause_s)
            self.paused_until = max(self.paused_until, until)
        future = self._pending.get(reply.request_id)
        if future is None or future.done():
            self.late_replies += 1
            log.info("reply for escalation %s arrived after its deadline; ignored", reply.request_id)
            return False
        future.set_result(reply)
        return True

    def paused(self) -> bool:
        return asyncio.get_running_loop().time() < self.paused_until

    async def wait_idle(self) -> None:
        """Until no escalation is outstanding (used by the shutdown drain)."""
        await self._idle.wait()

    def _release(self, request_id: str) -> None:
        self._pending.pop(request_id, None)
        if not self._pending:
            self._idle.set()
