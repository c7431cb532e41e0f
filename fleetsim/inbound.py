"""What reaches the simulated devices: escalation replies, signed commands, delivery confirmations
and the clock reply, decoded and validated by schemas/ like a node does."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from fleetsim.wire import float32
from schemas import (
    ClockReply,
    ClockRequest,
    Command,
    Confirm,
    DecodeError,
    EscalationReply,
    decode_for_topic,
    encode,
    new_msg_id,
)
from schemas.compact import ENCODING
from schemas.topics import Channel

if TYPE_CHECKING:
    from fleetsim.device import Device
    from fleetsim.sim import Simulator


class Inbound:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.wrong_epoch = 0

    def clock_request(self, device: Device) -> bytes:
        """A clock/1 request in JSON: what a node sends before it knows the bridge reads compact."""
        return encode(ClockRequest(msg_id=new_msg_id(), fleet_id=device.fleet, device_id=device.name, ts=time.time()))

    def handle(self, at: float, topic: str, payload: bytes) -> None:
        sim = self.sim
        try:
            message = decode_for_topic(sim.topics, topic, payload)
        except DecodeError as exc:  # counted and shown: the cloud sent something the contract refuses
            sim.counts.errors += 1
            print(f"fleetsim: undecodable message on {topic}: {exc}", file=sys.stderr, flush=True)
            return
        if isinstance(message, Confirm):
            self._confirm(at, message)
        elif isinstance(message, EscalationReply):
            self._reply(at, message)
        elif isinstance(message, Command):
            self._command(message)
        elif isinstance(message, ClockReply):
            sim.encoding_ok = sim.encoding_ok or ENCODING in message.accepts

    def _reply(self, at: float, reply: EscalationReply) -> None:
        sim = self.sim
        entry = sim.outstanding.pop(reply.request_id, None)
        if entry is None:
            sim.counts.late_replies += 1  # after the device gave up (its answer went out as edge_fallback)
            return
        ms = (at - entry.sent) * 1000
        sim.counts.answered += 1
        sim.counts.latencies_ms.append(ms)
        label = entry.label
        if reply.index is not None and reply.label == str(reply.index):
            label = reply.index
        confidence = reply.confidence if reply.confidence is not None else entry.confidence
        sim.answer(entry, label, confidence, "cloud", None, float32(ms), at)

    def _command(self, cmd: Command) -> None:
        """Acked as a node does: model_update received -> installed -> done (the rollout waits for
        "done"); every other action "done"."""
        sim = self.sim
        device = sim.by_name.get(cmd.device_id)
        if device is None:
            return
        sim.counts.commands += 1
        now = time.time()
        states = ["received", "done"]
        if cmd.action == "model_update" and cmd.update is not None:
            device.model = cmd.update.model
            states = ["received", "installed", "done"]
        for state in states:
            ack = device.ack(now, cmd.cmd_id, state, cmd.rollout_id, sim.track)
            sim.publish(device, Channel.CMD_ACK, ack, "cmd_ack")

    def _confirm(self, at: float, confirm: Confirm) -> None:
        sim = self.sim
        device = sim.by_name.get(confirm.device_id)
        if device is None:
            return
        if confirm.epoch != device.epoch:
            self.wrong_epoch += 1
            return
        waiting = device.unconfirmed
        confirmed, oldest = 0, at
        for first, last in confirm.ranges:
            seqs = (
                range(first, last + 1)
                if last - first < 4 * len(waiting) + 4
                else [s for s in waiting if first <= s <= last]
            )
            for seq in seqs:
                scheduled = waiting.pop(seq, None)
                if scheduled is not None:
                    confirmed += 1
                    oldest = min(oldest, scheduled)
        sim.counts.confirmed += confirmed
        sim.counts.confirm_age_max_s = max(sim.counts.confirm_age_max_s, at - oldest)
