"""`cloud-bridge cmd update|rollback|ping`: one signed command to one device, then its acks until the
final one (cloud_bridge/ota/commands.py signs, records and publishes it)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from pathlib import Path

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_bridge.cli.common import Commands, add_config, command
from cloud_bridge.cli.waiting import HINT_AFTER_S, Waiting
from cloud_bridge.config import load_config
from cloud_bridge.errors import ConfigError, MqttError, UsageError
from cloud_bridge.models.store import ModelStore
from cloud_bridge.ota.commands import FINAL_STATES, CommandSender
from cloud_bridge.ota.deltas import DeltaStore
from cloud_bridge.ota.keys import load_signer
from cloud_bridge.registry import Registry
from common.tls import client_context
from schemas.codec import decode
from schemas.errors import DecodeError
from schemas.messages import Command, CommandAck
from schemas.topics import Channel


def add_subparsers(sub: Commands) -> None:
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
        add_config(p, "[mqtt], [ota], [registry]")
        p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the final ack")
        p.add_argument("--rollout-id", default=None, help="tag the command with a rollout id")
        if name == "update":
            p.add_argument("--model", required=True, help="registered model name")
            p.add_argument("--version", required=True, help="registered model version")
        p.set_defaults(action_name=name)
        command(p, f"cmd {name}", _cmd)


def _split_device(text: str) -> tuple[str, str]:
    fleet, sep, device = text.partition("/")
    if not sep or not fleet or not device:
        raise UsageError(f"--device {text!r} must be FLEET/DEVICE")
    return fleet, device


def _cmd(args: argparse.Namespace) -> int:
    return asyncio.run(_send_and_wait(args))


async def _send_and_wait(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    fleet_id, device_id = _split_device(args.device)
    if config.ota.signing_key is None:
        raise ConfigError("[ota] signing_key is not configured: run `cloud-bridge keys generate --out DIR` first")
    signer = load_signer(Path(config.ota.signing_key), config.ota.key_id)
    topics = config.topics
    registry = Registry(config.registry_url)
    await registry.create()
    v5 = config.mqtt.protocol == "mqtt5"
    broker = f"{config.mqtt.host}:{config.mqtt.port}"
    try:
        async with aiomqtt.Client(
            config.mqtt.host,
            config.mqtt.port,
            identifier=f"cloud-bridge-cmd-{uuid.uuid4().hex[:12]}",
            username=config.mqtt.username,
            password=config.mqtt.password,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            tls_context=client_context(config.mqtt.tls_ca, error=ConfigError) if config.mqtt.tls_ca else None,
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
            waiting = Waiting(registry, fleet_id, device_id, command.action)
            return await _wait_final(client, command, args.timeout, waiting)
    except aiomqtt.MqttError as exc:
        raise MqttError(
            f"the broker at {broker} ({exc}): fix: start the broker, or check [mqtt] host, port, username and "
            f"password in {args.config}; `cloud-bridge check --config {args.config}` tests them one by one"
        ) from None
    finally:
        await registry.close()


async def _wait_final(client: aiomqtt.Client, command: Command, timeout_s: float, waiting: Waiting) -> int:
    """Print every ack of `command` until a final one (exit 0 done, 1 refused or failed) or the
    timeout (3). While nothing new arrives for HINT_AFTER_S, say once per state why it may wait."""
    hint = asyncio.create_task(waiting.explain_after(HINT_AFTER_S, None))
    try:
        async with asyncio.timeout(timeout_s):
            async for message in client.messages:
                try:
                    ack = decode(bytes(message.payload), CommandAck)
                except DecodeError:
                    continue
                if ack.cmd_id != command.cmd_id:
                    continue
                hint.cancel()
                progress = "" if ack.progress is None else f" progress={ack.progress:.0%}"
                print(f"ack state={ack.state}{progress}" + (f" reason={ack.reason}" if ack.reason else ""), flush=True)
                if ack.state in FINAL_STATES:
                    return 0 if ack.state == "done" else 1
                hint = asyncio.create_task(waiting.explain_after(HINT_AFTER_S, ack.state))
    except TimeoutError:
        print(f"no final ack for cmd_id={command.cmd_id} within {timeout_s}s", file=sys.stderr)
    finally:
        hint.cancel()
    return 3
