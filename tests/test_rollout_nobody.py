"""A rollout with nobody to update ends at once, with the reason in `rollout status`, instead of
waiting forever: every device already runs the target, no device of the fleet is online, or the
registry knows no device of the fleet."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import insert

from cloud_bridge.config import RolloutConfig
from cloud_bridge.models.store import ModelRecord
from cloud_bridge.ota.commands import Action
from cloud_bridge.registry import Device, Registry
from cloud_bridge.rollout.driver import RolloutDriver
from cloud_bridge.rollout.store import NewRollout, RolloutStore
from schemas.messages import Command

TARGET = ModelRecord("digits-edge", "2.0.0", "b" * 64, 1, Path("m.onnx"), ("0", "1"), (64,), {}, 0.0)


class Sender:
    """Counts the commands the driver would send."""

    def __init__(self) -> None:
        self.updates: list[str] = []

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
        self.updates.extend(device for device, _ in devices)
        raise AssertionError(f"no command expected, got {action} for {devices}")

    async def send_all(self, commands: Sequence[Command]) -> tuple[list[Command], Exception | None]:
        raise AssertionError("no command expected")


class Models:
    async def get(self, name: str, version: str) -> ModelRecord:
        return TARGET


@pytest.mark.parametrize(
    ("devices", "says"),
    [
        ([("d1", True, "b" * 64), ("d2", False, "b" * 64)], "all 2 devices of fleet f1 already run digits-edge 2.0.0"),
        ([("d1", False, "a" * 64), ("d2", False, "b" * 64)], "none of the 1 devices of fleet f1 that do not run"),
        ([], "the registry knows no device of fleet f1"),
    ],
)
async def test_a_rollout_with_nobody_to_update_ends_at_once(
    tmp_path: Path, devices: list[tuple[str, bool, str]], says: str
) -> None:
    registry = Registry(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    await registry.create()
    try:
        if devices:
            async with registry.engine.begin() as conn:
                rows = [
                    {"fleet_id": "f1", "device_id": d, "online": online, "last_seen": time.time(), "model_sha256": sha}
                    for d, online, sha in devices
                ]
                await conn.execute(insert(Device), rows)
        store = RolloutStore(registry)
        rid = await store.create(NewRollout("f1", TARGET, (50, 100), 10.0, {}))
        sender = Sender()
        driver = RolloutDriver(registry, Models(), sender, RolloutConfig(), "bridge-1")
        await driver.tick()
        row = await store.get(rid)
        assert row is not None
        assert (row["state"], row["phase"]) == ("done", "finished") and says in row["reason"]
        assert row["finished_at"] is not None and sender.updates == [] and driver.errors == 0
        assert await store.active() == []  # nothing left for any bridge to drive
    finally:
        await registry.close()
