"""A rollout stage's commands and acks are handled in bulk: a stage's deploy, its ack refresh and its
rollback take a few statements whatever the number of devices, and a broker failure half-way leaves the
unsent devices for the next tick (each device gets its update once). Real SQLite registry, the real
CommandSender (signing, recording) with a publish that counts, or fails, instead of a broker."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import event, insert

from cloud_bridge.config import RolloutConfig
from cloud_bridge.errors import MqttError
from cloud_bridge.models.store import ModelRecord
from cloud_bridge.ota.commands import CommandSender
from cloud_bridge.registry import CommandAckRow, CommandRow, Device, Registry
from cloud_bridge.rollout.driver import RolloutDriver
from cloud_bridge.rollout.store import NewRollout, RolloutStore
from schemas.msgid import new_msg_id
from schemas.signing import generate_private_key
from schemas.topics import Topics

FLEET = "f1"
OLD_SHA = "a" * 64
TARGET = ModelRecord("digits-edge", "2.0.0", "b" * 64, 1000, Path("m.onnx"), ("0", "1"), (64,), {}, 0.0)
DEVICES = 300


class Models:
    async def get(self, name: str, version: str) -> ModelRecord:
        return TARGET


class Broker:
    """Takes publishes until `fail_after` of them went out, then refuses them."""

    def __init__(self) -> None:
        self.fail_after: int | None = None
        self.topics: list[str] = []

    async def publish(self, topic: str, payload: bytes, qos: int, expiry: int | None) -> None:
        if self.fail_after is not None and len(self.topics) >= self.fail_after:
            raise MqttError("broker gone")
        self.topics.append(topic)


class Statements:
    """Counts the SQL statements (an executemany is one) the registry runs while active."""

    def __init__(self, registry: Registry) -> None:
        self.count = 0
        event.listen(registry.engine.sync_engine, "before_cursor_execute", self._seen)

    def _seen(self, *args: Any) -> None:
        self.count += 1


async def test_a_stage_is_sent_acked_and_rolled_back_in_a_few_statements(tmp_path: Path) -> None:
    registry = Registry(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    await registry.create()
    try:
        async with registry.engine.begin() as conn:
            rows = [
                {"fleet_id": FLEET, "device_id": f"d{i:04d}", "online": True, "last_seen": time.time(),
                 "model_name": "digits-edge", "model_version": "1.0.0", "model_sha256": OLD_SHA}
                for i in range(DEVICES)
            ]  # fmt: skip
            await conn.execute(insert(Device), rows)
        store = RolloutStore(registry)
        rid = await store.create(NewRollout(FLEET, TARGET, (100,), 60.0, {}))
        broker = Broker()
        sender = CommandSender(Topics(), generate_private_key(), None, broker.publish, registry=registry)
        driver = RolloutDriver(registry, Models(), sender, RolloutConfig(), "bridge-1")
        statements = Statements(registry)

        broker.fail_after = 100  # the broker goes away during the stage's sending
        await driver.tick()
        assert driver.errors == 1
        devices = await store.devices(rid)
        sent = [d for d in devices if d["state"] == "sent"]
        assert len(devices) == DEVICES and len(sent) == 100 and all(d["cmd_id"] for d in sent)
        assert {d["state"] for d in devices} == {"sent", "selected"}

        broker.fail_after = None
        statements.count = 0
        await driver.tick()
        assert driver.errors == 1 and statements.count < 25, statements.count
        devices = await store.devices(rid)
        assert {d["state"] for d in devices} == {"sent"}
        # Every device got its update once; every command was recorded before it went out.
        assert sorted(broker.topics) == sorted(f"fleet/{FLEET}/{d['device_id']}/cmd" for d in devices)
        assert await registry.count(CommandRow) >= DEVICES

        # Every device acks: one statement reads the latest acks, one writes the rows.
        now = time.time()
        acks = [
            {"msg_id": new_msg_id(), "fleet_id": FLEET, "device_id": d["device_id"], "cmd_id": d["cmd_id"],
             "state": state, "reason": None, "ts": now + n}
            for d in devices
            for n, state in enumerate(("received", "done" if d["device_id"] != "d0007" else "health_failed"))
        ]  # fmt: skip
        async with registry.engine.begin() as conn:
            await conn.execute(insert(CommandAckRow), acks)
        statements.count = 0
        broker.topics.clear()
        await driver.tick()  # one device failed its health check: the stage rolls back
        rollout = await store.get(rid)
        assert rollout is not None and rollout["state"] == "rolled_back", rollout
        assert "install_failures: 1/300" in rollout["reason"]
        assert statements.count < 30, statements.count
        devices = await store.devices(rid)
        assert {d["device_id"]: d["state"] for d in devices if d["state"] != "done"} == {"d0007": "health_failed"}
        # Rollback commands to the devices that may run the new model (those done), once each.
        assert len(broker.topics) == DEVICES - 1 and all(d["rollback_cmd_id"] for d in devices if d["state"] == "done")
        await driver.tick()
        assert len(broker.topics) == DEVICES - 1 and await store.active() == []
    finally:
        await registry.close()
