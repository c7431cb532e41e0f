"""Signed commands to devices: build, sign (Ed25519), record in the `commands` table, publish.

Commands go QoS 1, not retained, to `{prefix}/{fleet}/{device}/cmd`; the device's persistent session
holds them while it is offline, and over MQTT 5 the message expiry equals the command's expiry so a
broker does not deliver a command the device would refuse anyway. Each command is written to the
registry *before* it is published, so an ack (stored by ingestion in `command_acks`) always finds it.
`command_states` joins the two: the latest ack per (device, cmd_id).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import insert, select

from cloud_bridge.models.store import ModelRecord, ModelStore
from cloud_bridge.ota.deltas import DeltaArtifact, DeltaStore, delta_for_device, delta_from
from cloud_bridge.registry import CommandAckRow, CommandRow, Registry
from schemas.codec import encode
from schemas.messages import Command, ModelDelta, ModelUpdate
from schemas.msgid import new_msg_id
from schemas.signing import Ed25519PrivateKey, sign_command
from schemas.topics import Channel, Topics

log = logging.getLogger(__name__)

# topic, payload, qos, MQTT 5 message expiry in seconds (None: none)
Publish = Callable[[str, bytes, int, int | None], Awaitable[None]]
Action = Literal["model_update", "rollback", "ping", "shadow_start", "shadow_stop"]

# A command is finished once the device acks one of these.
FINAL_STATES = frozenset({"rejected", "done", "failed", "health_failed", "rolled_back"})


class CommandSender:
    """Signs and publishes commands; `registry` (recommended) records each one for joining acks."""

    def __init__(
        self,
        topics: Topics,
        key: Ed25519PrivateKey,
        key_id: str | None,
        publish: Publish,
        chunk_size: int = 65536,
        ttl_s: float = 3600.0,
        *,
        registry: Registry | None = None,
        models: ModelStore | None = None,
        deltas: DeltaStore | None = None,
    ) -> None:
        self.topics = topics
        self._key = key
        self._key_id = key_id
        self._publish = publish
        self.chunk_size = chunk_size
        self.ttl_s = ttl_s
        self._registry = registry
        # With all three, an update offers a patch from the model the device runs (cloud_bridge/ota/deltas.py).
        self._models = models
        self._deltas = deltas
        self.sent = 0

    def build(
        self,
        fleet_id: str,
        device_id: str,
        action: Action,
        *,
        update: ModelUpdate | None = None,
        rollout_id: str | None = None,
        stage: int | None = None,
        now: float | None = None,
    ) -> Command:
        """A signed command (not sent): for callers that publish themselves, and tests."""
        now = time.time() if now is None else now
        command = Command(
            msg_id=new_msg_id(),
            fleet_id=fleet_id,
            device_id=device_id,
            ts=now,
            cmd_id=new_msg_id(),
            action=action,
            issued_at=now,
            expires_at=now + self.ttl_s,
            key_id="unsigned",
            update=update,
            rollout_id=rollout_id,
            stage=stage,
        )
        return sign_command(command, self._key, self._key_id)

    def model_update(self, fleet_id: str, record: ModelRecord, delta: DeltaArtifact | None = None) -> ModelUpdate:
        return ModelUpdate(
            model=record.ref,
            size=record.size,
            chunk_size=self.chunk_size,
            chunks=self._chunks(record.size),
            chunk_topic=self.topics.model_chunks(fleet_id, record.sha256),
            delta=None
            if delta is None
            else ModelDelta(
                base_sha256=delta.base_sha256,
                sha256=delta.sha256,
                size=delta.size,
                chunks=self._chunks(delta.size),
                chunk_topic=self.topics.model_chunks(fleet_id, delta.sha256),
            ),
        )

    def _chunks(self, size: int) -> int:
        return max(1, math.ceil(size / self.chunk_size))

    async def _delta(self, fleet_id: str, device_id: str, record: ModelRecord) -> DeltaArtifact | None:
        if self._registry is None or self._models is None or self._deltas is None:
            return None
        try:
            return await delta_for_device(self._deltas, self._models, self._registry, fleet_id, device_id, record)
        except (OSError, ValueError, MemoryError) as exc:  # bsdiff4 raises ValueError on bad input
            log.error(
                "no delta for %s/%s to %s: %s; sending the whole model", fleet_id, device_id, record.sha256[:12], exc
            )
            return None

    async def _delta_from(self, current: str | None, record: ModelRecord) -> DeltaArtifact | None:
        if self._registry is None or self._models is None or self._deltas is None:
            return None
        try:
            return await delta_from(self._deltas, self._models, current, record)
        except (OSError, ValueError, MemoryError) as exc:  # bsdiff4 raises ValueError on bad input
            base = "?" if current is None else current[:12]
            log.error("no delta from %s to %s: %s; sending the whole model", base, record.sha256[:12], exc)
            return None

    async def build_many(
        self,
        fleet_id: str,
        action: Action,
        devices: Sequence[tuple[str, str | None]],
        record: ModelRecord | None = None,
        *,
        rollout_id: str | None = None,
        stage: int | None = None,
    ) -> list[Command]:
        """Signed commands (not sent) of one action for many (device_id, sha256 of the model it runs)
        pairs: `record` is the model of a model_update or shadow_start; an update offers each device
        the patch from the model it runs (one lookup per distinct model, not per device)."""
        if action in ("model_update", "shadow_start") and record is None:
            raise ValueError(f"{action} needs the model record")
        # An update per distinct model the devices run (its patch differs); a shadow is a whole download.
        updates: dict[str | None, ModelUpdate] = {}
        commands: list[Command] = []
        for device_id, current in devices:
            update: ModelUpdate | None = None
            if record is not None and action in ("model_update", "shadow_start"):
                base = current if action == "model_update" else None
                update = updates.get(base)
                if update is None:
                    delta = await self._delta_from(base, record) if base is not None else None
                    update = updates[base] = self.model_update(fleet_id, record, delta)
            commands.append(self.build(fleet_id, device_id, action, update=update, rollout_id=rollout_id, stage=stage))
        return commands

    async def send_all(
        self, commands: Sequence[Command], in_flight: int = 64
    ) -> tuple[list[Command], Exception | None]:
        """Record every command in one statement, then publish them `in_flight` at a time (a rollout
        stage at 10,000 devices was 10,000 transactions and round trips one after another). Stops after
        the first group with a failure; returns the commands published and that failure (None: all
        were), so the caller records what went out and retries the rest."""
        if self._registry is not None and commands:
            await record_commands(self._registry, commands)
        published: list[Command] = []
        for start in range(0, len(commands), in_flight):
            group = commands[start : start + in_flight]
            outcomes = await asyncio.gather(*(self._publish_command(c) for c in group), return_exceptions=True)
            failure: Exception | None = None
            for command, outcome in zip(group, outcomes, strict=True):
                if outcome is None:
                    published.append(command)
                elif isinstance(outcome, Exception):
                    failure = failure or outcome
                else:  # CancelledError, KeyboardInterrupt: not a publish failure
                    raise outcome
            self.sent += sum(o is None for o in outcomes)
            if failure is not None:
                return published, failure
        return published, None

    async def send_update(
        self,
        fleet_id: str,
        device_id: str,
        record: ModelRecord,
        *,
        rollout_id: str | None = None,
        stage: int | None = None,
    ) -> Command:
        update = self.model_update(fleet_id, record, await self._delta(fleet_id, device_id, record))
        command = self.build(fleet_id, device_id, "model_update", update=update, rollout_id=rollout_id, stage=stage)
        await self.send(command)
        return command

    async def send_shadow(
        self,
        fleet_id: str,
        device_id: str,
        record: ModelRecord | None,
        *,
        rollout_id: str | None = None,
        stage: int | None = None,
    ) -> Command:
        """`shadow_start` with `record` (fetched like an update, run beside the active model, never
        installed), or `shadow_stop` without one. A shadow is a whole download: no patch is offered."""
        if record is None:
            command = self.build(fleet_id, device_id, "shadow_stop", rollout_id=rollout_id, stage=stage)
        else:
            update = self.model_update(fleet_id, record)
            command = self.build(fleet_id, device_id, "shadow_start", update=update, rollout_id=rollout_id, stage=stage)
        await self.send(command)
        return command

    async def send_rollback(self, fleet_id: str, device_id: str, *, rollout_id: str | None = None) -> Command:
        command = self.build(fleet_id, device_id, "rollback", rollout_id=rollout_id)
        await self.send(command)
        return command

    async def send_ping(self, fleet_id: str, device_id: str) -> Command:
        command = self.build(fleet_id, device_id, "ping")
        await self.send(command)
        return command

    async def send(self, command: Command) -> None:
        """Record (if a registry is set), then publish QoS 1, not retained, expiring with the command."""
        if self._registry is not None:
            await record_command(self._registry, command)
        await self._publish_command(command)
        self.sent += 1

    async def _publish_command(self, command: Command) -> None:
        topic = self.topics.device(command.fleet_id, command.device_id, Channel.CMD)
        expiry = max(1, math.ceil(command.expires_at - time.time()))
        await self._publish(topic, encode(command), 1, expiry)


async def record_command(registry: Registry, command: Command) -> None:
    await record_commands(registry, [command])


async def record_commands(registry: Registry, commands: Sequence[Command]) -> None:
    """The `commands` rows of `commands`, in one statement."""
    rows = []
    for command in commands:
        model = command.update.model if command.update is not None else None
        rows.append(
            {
                "cmd_id": command.cmd_id,
                "fleet_id": command.fleet_id,
                "device_id": command.device_id,
                "action": command.action,
                "model_name": model.name if model else None,
                "model_version": model.version if model else None,
                "model_sha256": model.sha256 if model else None,
                "rollout_id": command.rollout_id,
                "stage": command.stage,
                "sent_at": command.issued_at,
                "expires_at": command.expires_at,
            }
        )
    async with registry.engine.begin() as conn:
        await conn.execute(insert(CommandRow), rows)


@dataclass(frozen=True)
class CommandState:
    """A sent command and the latest ack its device sent for it (state None: no ack yet)."""

    cmd_id: str
    fleet_id: str
    device_id: str
    action: str
    model_name: str | None
    model_version: str | None
    rollout_id: str | None
    stage: int | None
    sent_at: float
    state: str | None
    reason: str | None
    acked_at: float | None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


async def command_states(
    registry: Registry,
    *,
    fleet_id: str | None = None,
    device_id: str | None = None,
    rollout_id: str | None = None,
    cmd_ids: Sequence[str] | None = None,
) -> list[CommandState]:
    """The latest ack state per (device, cmd_id) of the sent commands matching the filters."""
    cmds = CommandRow.__table__
    acks = CommandAckRow.__table__
    query = select(cmds)
    if fleet_id is not None:
        query = query.where(cmds.c.fleet_id == fleet_id)
    if device_id is not None:
        query = query.where(cmds.c.device_id == device_id)
    if rollout_id is not None:
        query = query.where(cmds.c.rollout_id == rollout_id)
    if cmd_ids is not None:
        query = query.where(cmds.c.cmd_id.in_(list(cmd_ids)))
    async with registry.engine.connect() as conn:
        sent = [dict(r._mapping) for r in await conn.execute(query.order_by(cmds.c.sent_at))]
        ids = [s["cmd_id"] for s in sent]
        latest: dict[tuple[str, str, str], dict[str, Any]] = {}
        for start in range(0, len(ids), 500):
            rows = await conn.execute(select(acks).where(acks.c.cmd_id.in_(ids[start : start + 500])))
            for row in rows:
                found = dict(row._mapping)
                key = (str(found["fleet_id"]), str(found["device_id"]), str(found["cmd_id"]))
                # UUIDv7 msg ids order acks a device minted within the same timestamp.
                best = latest.get(key)
                if best is None or (found["ts"], found["msg_id"]) > (best["ts"], best["msg_id"]):
                    latest[key] = found
    states: list[CommandState] = []
    for s in sent:
        ack = latest.get((s["fleet_id"], s["device_id"], s["cmd_id"]))
        states.append(
            CommandState(
                cmd_id=s["cmd_id"],
                fleet_id=s["fleet_id"],
                device_id=s["device_id"],
                action=s["action"],
                model_name=s["model_name"],
                model_version=s["model_version"],
                rollout_id=s["rollout_id"],
                stage=s["stage"],
                sent_at=s["sent_at"],
                state=None if ack is None else str(ack["state"]),
                reason=None if ack is None else (None if ack["reason"] is None else str(ack["reason"])),
                acked_at=None if ack is None else float(ack["ts"]),
            )
        )
    return states
