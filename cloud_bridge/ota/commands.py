"""Signed commands to devices: build, sign (Ed25519), record in the `commands` table, publish.

Commands go QoS 1, not retained, to `{prefix}/{fleet}/{device}/cmd`; the device's persistent session
holds them while it is offline, and over MQTT 5 the message expiry equals the command's expiry so a
broker does not deliver a command the device would refuse anyway. Each command is written to the
registry *before* it is published, so an ack (stored by ingestion in `command_acks`) always finds it.
`command_states` joins the two: the latest ack per (device, cmd_id).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import insert, select

from cloud_bridge.config import load_config
from cloud_bridge.errors import ModelStoreError
from cloud_bridge.models.store import ModelRecord, ModelStore
from cloud_bridge.ota.deltas import DeltaArtifact, DeltaStore, delta_for_device
from cloud_bridge.ota.keys import load_signer
from cloud_bridge.registry import CommandAckRow, CommandRow, Registry
from schemas.codec import decode, encode
from schemas.errors import DecodeError
from schemas.messages import Command, CommandAck, ModelDelta, ModelUpdate
from schemas.msgid import new_msg_id
from schemas.signing import Ed25519PrivateKey, SignatureError, sign_command
from schemas.topics import Channel, Topics

log = logging.getLogger(__name__)

# topic, payload, qos, MQTT 5 message expiry in seconds (None: none)
Publish = Callable[[str, bytes, int, int | None], Awaitable[None]]
Action = Literal["model_update", "rollback", "ping"]

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
        topic = self.topics.device(command.fleet_id, command.device_id, Channel.CMD)
        expiry = max(1, math.ceil(command.expires_at - time.time()))
        await self._publish(topic, encode(command), 1, expiry)
        self.sent += 1


async def record_command(registry: Registry, command: Command) -> None:
    model = command.update.model if command.update is not None else None
    async with registry.engine.begin() as conn:
        await conn.execute(
            insert(CommandRow).values(
                cmd_id=command.cmd_id,
                fleet_id=command.fleet_id,
                device_id=command.device_id,
                action=command.action,
                model_name=model.name if model else None,
                model_version=model.version if model else None,
                model_sha256=model.sha256 if model else None,
                rollout_id=command.rollout_id,
                stage=command.stage,
                sent_at=command.issued_at,
                expires_at=command.expires_at,
            )
        )


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


# ---- CLI: `cloud-bridge cmd update|rollback|ping` ------------------------------------------------


def add_subparsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser(
        "cmd",
        help="send one signed command to a device and wait for its final ack",
        description="Connects to the broker in [mqtt], signs with [ota] signing_key, publishes the command "
        "on the device's cmd topic, prints every ack and exits 0 on done, 1 on a refusal or "
        "failure, 3 when no final ack came within --timeout. A running bridge must serve the model chunks.",
    )
    csub = cmd.add_subparsers(dest="cmd_command", required=True)
    for name, help_text in (
        ("update", "install a registered model version (--model N --version V)"),
        ("rollback", "return to the previously active model"),
        ("ping", "check that the device verifies commands and answers"),
    ):
        p = csub.add_parser(name, help=help_text)
        p.add_argument("--device", required=True, help="FLEET/DEVICE, e.g. demo/pi-0001")
        p.add_argument("--config", type=Path, default=None, help="the bridge's TOML config ([mqtt], [ota])")
        p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the final ack")
        p.add_argument("--rollout-id", default=None, help="tag the command with a rollout id")
        if name == "update":
            p.add_argument("--model", required=True, help="registered model name")
            p.add_argument("--version", required=True, help="registered model version")
        p.set_defaults(handler=_cli_cmd, action_name=name)


def _split_device(text: str) -> tuple[str, str]:
    fleet, sep, device = text.partition("/")
    if not sep or not fleet or not device:
        raise ValueError(f"--device {text!r} must be FLEET/DEVICE")
    return fleet, device


def _cli_cmd(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_send_and_wait(args))
    except (ValueError, SignatureError, ModelStoreError) as exc:
        print(f"cloud-bridge cmd {args.action_name}: {exc}", file=sys.stderr)
        return 2


async def _send_and_wait(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    fleet_id, device_id = _split_device(args.device)
    if config.ota.signing_key is None:
        raise ValueError("[ota] signing_key is not configured: run `cloud-bridge keys generate --out DIR` first")
    signer = load_signer(Path(config.ota.signing_key), config.ota.key_id)
    topics = config.topics
    registry = Registry(config.registry_url)
    await registry.create()
    v5 = config.mqtt.protocol == "mqtt5"
    try:
        async with aiomqtt.Client(
            config.mqtt.host,
            config.mqtt.port,
            identifier=f"cloud-bridge-cmd-{uuid.uuid4().hex[:12]}",
            username=config.mqtt.username,
            password=config.mqtt.password,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            tls_params=aiomqtt.TLSParameters(ca_certs=config.mqtt.tls_ca) if config.mqtt.tls_ca else None,
        ) as client:

            async def publish(topic: str, payload: bytes, qos: int, expiry: int | None) -> None:
                props = None
                if v5 and expiry is not None:
                    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                    props.MessageExpiryInterval = expiry
                await client.publish(topic, payload, qos=qos, properties=props)

            models = ModelStore(config.model_store_dir, registry)
            sender = CommandSender(
                topics,
                signer.key,
                signer.key_id,
                publish,
                config.ota.chunk_size,
                config.ota.command_ttl_s,
                registry=registry,
                models=models,
                deltas=DeltaStore(models, config.ota.delta_max_fraction),
            )
            await client.subscribe(topics.device(fleet_id, device_id, Channel.CMD_ACK), qos=1)
            if args.action_name == "update":
                record = await models.get(args.model, args.version)
                command = await sender.send_update(fleet_id, device_id, record, rollout_id=args.rollout_id)
            elif args.action_name == "rollback":
                command = await sender.send_rollback(fleet_id, device_id, rollout_id=args.rollout_id)
            else:
                command = await sender.send_ping(fleet_id, device_id)
            print(f"sent {command.action} cmd_id={command.cmd_id} to {fleet_id}/{device_id}", flush=True)
            return await _wait_final(client, command, args.timeout)
    finally:
        await registry.close()


async def _wait_final(client: aiomqtt.Client, command: Command, timeout_s: float) -> int:
    try:
        async with asyncio.timeout(timeout_s):
            async for message in client.messages:
                try:
                    ack = decode(bytes(message.payload), CommandAck)
                except DecodeError:
                    continue
                if ack.cmd_id != command.cmd_id:
                    continue
                progress = "" if ack.progress is None else f" progress={ack.progress:.0%}"
                print(f"ack state={ack.state}{progress}" + (f" reason={ack.reason}" if ack.reason else ""), flush=True)
                if ack.state in FINAL_STATES:
                    return 0 if ack.state == "done" else 1
    except TimeoutError:
        print(f"no final ack for cmd_id={command.cmd_id} within {timeout_s}s", file=sys.stderr)
    return 3
