"""The automatic trigger (`[improve] auto = true`, or `cloud-bridge improve run --auto`): on each pass of
the worker (cloud_bridge/improve/worker.py), per watched fleet, start a loop for every model version of
the fleet that has devices with a firing data-drift alert (cloud_bridge/improve/trigger.py) and at least
`min_human` human labels on their samples, unless a loop of that model is running, or one for that base
version ended less than `cooldown_s` ago (a gate that failed waits for more labels, not for the next
pass). A model version that is not registered cannot be retrained and is skipped, logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from cloud_bridge.errors import ModelStoreError
from cloud_bridge.improve.store import RUNNING, ImproveError, LoopStore, NewLoop
from cloud_bridge.improve.trigger import firing_cohorts, human_labels
from cloud_bridge.models.store import ModelStore
from cloud_bridge.registry import ImproveLoopRow, Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoPolicy:
    fleet: str
    min_human: int = 50
    cooldown_s: float = 3600.0
    options: dict[str, Any] = field(default_factory=dict)


async def _recent(registry: Registry, fleet: str, name: str, version: str, since: float) -> bool:
    """Whether a loop of this base is running, or ended after `since`."""
    t = ImproveLoopRow
    async with registry.engine.connect() as conn:
        rows = await conn.execute(
            select(t.state, t.updated_at).where(t.fleet_id == fleet, t.base_name == name, t.base_version == version)
        )
        return any(r.state == RUNNING or r.updated_at >= since for r in rows)


async def auto_start(registry: Registry, models: ModelStore, policy: AutoPolicy, now: float) -> list[str]:
    """Start the loops the policy calls for; returns their ids."""
    started = []
    loops = LoopStore(registry)
    for (name, version), devices in sorted((await firing_cohorts(registry, policy.fleet)).items()):
        if await _recent(registry, policy.fleet, name, version, now - policy.cooldown_s):
            continue
        labels = await human_labels(registry, policy.fleet, devices)
        if labels < policy.min_human:
            log.info(
                "improve auto: %s %s drifted on %s, %d/%d human labels",
                name,
                version,
                devices,
                labels,
                policy.min_human,
            )
            continue
        try:
            await models.get(name, version)
            loop_id = await loops.create(NewLoop(policy.fleet, tuple(devices), name, version, policy.options), now)
        except (ModelStoreError, ImproveError) as exc:
            log.warning("improve auto: no loop for %s %s: %s", name, version, exc)
            continue
        log.info(
            "improve auto: started loop %s for %s %s on %s (%d human labels)", loop_id, name, version, devices, labels
        )
        started.append(loop_id)
    return started
