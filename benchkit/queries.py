"""The operators' registry queries at fleet size, timed in-process (the CLI's own functions, without
its start-up): `devices`, `alerts`, `rollout status`, and what a rollout reads to pick its stages and
judge them (the fleet's devices, its recent telemetry)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from cloud_bridge.cli.alerts import recent_alerts
from cloud_bridge.cli.devices import fleet_devices
from cloud_bridge.registry import Registry
from cloud_bridge.rollout.store import RolloutStore


async def _timed(call: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await call()
    return time.perf_counter() - start


async def time_queries(url: str, fleet: str = "sim") -> dict[str, float]:
    registry = Registry(url)
    store = RolloutStore(registry)
    now = time.time()
    try:
        return {
            "devices": await _timed(lambda: fleet_devices(registry, now, 300.0)),
            "alerts": await _timed(lambda: recent_alerts(registry, now - 86400)),
            "rollout status": await _timed(store.all),
            "rollout stage selection (fleet)": await _timed(lambda: store.fleet(fleet)),
            "rollout judge (telemetry 10 min)": await _timed(lambda: store.telemetry(fleet, now - 600)),
        }
    finally:
        await registry.close()
