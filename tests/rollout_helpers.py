"""Shared by the rollout tests: the test's own view of a bridge's registry, polled with a deadline."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

from cloud_bridge.config import BridgeConfig
from cloud_bridge.models.store import ModelStore
from cloud_bridge.registry import Registry
from cloud_bridge.rollout.store import RolloutStore

FLEET = "f1"


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
        await self.wait(lambda: self.store.fleet(FLEET), lambda devices: sum(d.online for d in devices) >= n, limit_s)

    async def wait_rollout(
        self, rid: str, predicate: Callable[[dict[str, Any]], bool], limit_s: float = 30.0
    ) -> dict[str, Any]:
        async def fetch() -> dict[str, Any]:
            row = await self.store.get(rid)
            assert row is not None
            return row

        row: dict[str, Any] = await self.wait(fetch, predicate, limit_s)
        return row

    @staticmethod
    async def wait(fetch: Callable[[], Any], predicate: Callable[[Any], bool], limit_s: float) -> Any:
        """Poll (the database, or the simulated devices) until `predicate` holds, bounded by `limit_s`."""
        deadline = time.monotonic() + limit_s
        while True:
            value = fetch()
            if inspect.isawaitable(value):
                value = await value
            if predicate(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not reached in {limit_s}s; last value: {value}")
            await asyncio.sleep(0.1)
