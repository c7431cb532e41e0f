"""Shared by the rollout tests: the test's own view of a bridge's registry, polled with a deadline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_bridge.config import BridgeConfig
from cloud_bridge.models.store import ModelStore
from cloud_bridge.registry import Registry
from cloud_bridge.rollout.store import RolloutStore
from tests.config_files import write_bridge_config
from tests.poll import wait_for_async

FLEET = "f1"
# The registry is polled: a rollout's progress has no event the test could wait on.
POLL_S = 0.1


def cli_config(tmp_path: Path, config: BridgeConfig) -> Path:
    """The TOML file for `cloud-bridge rollout ...`: the running bridge's registry and signing key."""
    return write_bridge_config(tmp_path, state_dir=config.state_dir, ota={"signing_key": config.ota.signing_key})


class Db:
    """The test's own view of the bridge's registry file."""

    def __init__(self, config: BridgeConfig) -> None:
        self.registry = Registry(config.registry_url)
        self.store = RolloutStore(self.registry)
        self.models = ModelStore(config.model_store_dir, self.registry)

    async def __aenter__(self) -> Db:
        await self.registry.create()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.registry.close()

    async def wait_devices(self, n: int, limit_s: float = 20.0) -> None:
        await wait_for_async(
            lambda: self.store.fleet(FLEET),
            limit_s,
            f"{n} devices online",
            until=lambda devices: sum(d.online for d in devices) >= n,
            interval=POLL_S,
        )

    async def wait_rollout(
        self, rid: str, predicate: Callable[[dict[str, Any]], bool], limit_s: float = 30.0
    ) -> dict[str, Any]:
        async def fetch() -> dict[str, Any]:
            row = await self.store.get(rid)
            assert row is not None
            return row

        row: dict[str, Any] = await wait_for_async(
            fetch, limit_s, f"rollout {rid} to reach the awaited state", until=predicate, interval=POLL_S
        )
        return row
