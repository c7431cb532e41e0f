"""The improvement worker: every `[improve] tick_s`, one pass that starts the loops the automatic policy
calls for (with `auto`; cloud_bridge/improve/policy.py) and drives each running loop one phase
(cloud_bridge/improve/driver.py).

`cloud-bridge improve run` runs it as a process of its own; with `[improve] in_bridge = true` the bridge
runs it beside ingestion (cloud_bridge/app.py). State lives in the registry only, so either may stop at
any point: the leases it holds are handed back when it stops, and the next worker resumes each loop at
its recorded phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from cloud_bridge.config import BridgeConfig, ImproveConfig
from cloud_bridge.improve.driver import ImproveDriver
from cloud_bridge.improve.policy import AutoPolicy, auto_start
from cloud_bridge.improve.trigger import firing_fleets
from cloud_bridge.models.store import ModelStore
from cloud_bridge.registry import Registry
from cloud_bridge.tsdb import TsdbWriter

log = logging.getLogger(__name__)


class ImproveWorker:
    def __init__(self, driver: ImproveDriver, config: ImproveConfig, clock: Callable[[], float] = time.time) -> None:
        self.driver = driver
        self.config = config
        self.clock = clock
        self.started: list[str] = []  # loops the policy started, oldest first
        self.failed_passes = 0

    @classmethod
    def for_bridge(
        cls,
        config: BridgeConfig,
        registry: Registry,
        models: ModelStore,
        owner: str,
        tsdb: TsdbWriter | None = None,
        improve: ImproveConfig | None = None,
    ) -> ImproveWorker:
        """A worker for this bridge config: jobs under state_dir/improve, `[improve]` (or `improve`, the
        command line's version of it) for the policy and the lease."""
        settings = improve or config.improve
        work = Path(config.state_dir) / "improve"
        cloud = config.escalation.model
        cloud_model = Path(cloud) if cloud else None
        lease_s = settings.lease_s
        driver = ImproveDriver(registry, models, work, owner, lease_s=lease_s, tsdb=tsdb, cloud_model=cloud_model)
        return cls(driver, settings)

    async def pass_once(self) -> list[str]:
        """Start what the policy calls for, then drive every running loop one phase; returns the loops started."""
        started: list[str] = []
        cfg = self.config
        if cfg.auto:
            fleets = list(cfg.fleets) or await firing_fleets(self.driver.registry)
            for fleet in fleets:
                policy = AutoPolicy(fleet, cfg.min_human, cfg.cooldown_s, cfg.loop_options())
                started += await auto_start(self.driver.registry, self.driver.models, policy, self.clock())
        self.started += started
        await self.driver.tick()
        return started

    async def run(self, stop: asyncio.Event, *, once: bool = False, contain_errors: bool = False) -> None:
        """Pass every tick_s until `stop` is set (or once), then hand the leases back.

        `contain_errors` (the bridge's worker): a pass that raised is logged and counted and the next pass
        tries again, since a locked registry or a bug in a loop must not stop the bridge's ingestion. A
        worker process of its own lets the error end it, with the message on its command line."""
        try:
            while not stop.is_set():
                try:
                    await self.pass_once()
                except Exception:
                    if not contain_errors:
                        raise
                    self.failed_passes += 1
                    log.exception("improve worker: pass failed (failed_passes=%d); retried", self.failed_passes)
                if once:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.tick_s)
        finally:
            await self.driver.store.release(self.driver.owner)
