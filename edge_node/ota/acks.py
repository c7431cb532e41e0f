"""Command acks: what the device tells the cloud about each command, stored in the outbox.

One sender for every ack: the agent's (received, rejected, downloading, verifying, failed, done)
and the installer's (installing, installed, health_failed, rolled_back, done). An ack that the
outbox refuses is logged and counted; it never fails the command it reports on.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Literal, Protocol

from edge_node.errors import OutboxError
from edge_node.uplink.outbox import OutMessage, Priority
from edge_node.uplink.wire import Wire
from schemas import Channel, Command, CommandAck, ModelRef, new_msg_id
from schemas.messages import AckState

log = logging.getLogger(__name__)


class Outbound(Protocol):
    """What the OTA side needs from the outbox (edge_node/uplink/outbox.py Outbox)."""

    async def put(self, msg: OutMessage) -> None: ...


class CommandAcks:
    """Builds CommandAck messages and stores them in the outbox (CONTROL priority)."""

    def __init__(self, outbox: Outbound, wire: Wire, fleet_id: str, device_id: str) -> None:
        self.outbox = outbox
        self.wire = wire  # CMD_ACK messages are confirmed: the rollout's state depends on them
        self.fleet_id, self.device_id = fleet_id, device_id
        self.sent: Counter[str] = Counter()  # acks stored, by state
        self.failed = 0  # acks the outbox refused

    async def send(
        self,
        command: Command,
        state: AckState,
        *,
        reason: str | None = None,
        progress: float | None = None,
        model: ModelRef | None = None,
        active_slot: Literal["A", "B"] | None = None,
    ) -> None:
        """Ack `command`; `model` defaults to the model its update names."""
        if model is None and command.update is not None:
            model = command.update.model
        await self.send_for(
            command.cmd_id,
            state,
            reason=reason,
            progress=progress,
            model=model,
            active_slot=active_slot,
            rollout_id=command.rollout_id,
        )

    async def send_for(
        self,
        cmd_id: str,
        state: AckState,
        *,
        reason: str | None = None,
        progress: float | None = None,
        model: ModelRef | None = None,
        active_slot: Literal["A", "B"] | None = None,
        rollout_id: str | None = None,
    ) -> None:
        """Ack the command `cmd_id` when only what was persisted of it is at hand (a switch on
        probation across a restart)."""
        ack = CommandAck(
            msg_id=new_msg_id(),
            fleet_id=self.fleet_id,
            device_id=self.device_id,
            ts=time.time(),
            cmd_id=cmd_id,
            state=state,
            reason=reason[:1024] if reason else None,
            progress=progress,
            model=model,
            active_slot=active_slot,
            rollout_id=rollout_id,
        )
        log.info("cmd ack cmd_id=%s state=%s slot=%s reason=%s", cmd_id, state, active_slot, reason)
        try:
            await self.outbox.put(self.wire.out(Channel.CMD_ACK, ack, Priority.CONTROL))
        except OutboxError as exc:
            self.failed += 1
            log.error("ack %s for command %s not stored: %s", state, cmd_id, exc)
            return
        self.sent[state] += 1
