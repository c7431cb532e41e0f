"""When to start a loop: devices of a fleet whose drift alert on the base model is firing now, and
enough human labels on their samples.

An alert episode is firing while the registry holds its `firing` row and no `resolved` row
(cloud_bridge/drift/store.py writes one of each per episode); latency alerts are left out: a slower
model is not a data problem that labels fix.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from cloud_bridge.registry import DriftEpisodeRow, LabelRow, Registry, SampleRow
from cloud_bridge.samples.labels import HUMAN

DATA_KINDS_EXCLUDED = ("latency",)


async def _firing(registry: Registry, fleet: str | None) -> dict[tuple[str, str, str], set[str]]:
    """(fleet, model name, version) -> devices with a firing (not yet resolved) data-drift episode on it."""
    e = DriftEpisodeRow
    query = select(e.fleet_id, e.device_id, e.model_name, e.model_version, e.kind, e.episode, e.state).where(
        e.kind.not_in(DATA_KINDS_EXCLUDED)
    )
    if fleet is not None:
        query = query.where(e.fleet_id == fleet)
    async with registry.engine.connect() as conn:
        rows = list(await conn.execute(query))

    def episode(r: Any) -> tuple[str, ...]:
        return (r.fleet_id, r.device_id, r.model_name, r.model_version, r.kind, r.episode)

    resolved = {episode(r) for r in rows if r.state == "resolved"}
    out: dict[tuple[str, str, str], set[str]] = {}
    for r in rows:
        if r.state == "firing" and episode(r) not in resolved:
            out.setdefault((r.fleet_id, r.model_name, r.model_version), set()).add(r.device_id)
    return out


async def firing_cohorts(registry: Registry, fleet: str) -> dict[tuple[str, str], list[str]]:
    """(model name, version) -> devices with a firing (not yet resolved) data-drift episode on it."""
    firing = await _firing(registry, fleet)
    return {(name, version): sorted(devices) for (_, name, version), devices in firing.items()}


async def firing_fleets(registry: Registry) -> list[str]:
    """The fleets with a firing data-drift alert on any device (what an automatic policy that watches every
    fleet looks at)."""
    return sorted({fleet for fleet, _, _ in await _firing(registry, None)})


async def drifted_devices(registry: Registry, fleet: str, model_name: str, model_version: str) -> list[str]:
    """Devices with a firing (not yet resolved) data-drift episode on this model version."""
    return (await firing_cohorts(registry, fleet)).get((model_name, model_version), [])


async def human_labels(registry: Registry, fleet: str, devices: list[str]) -> int:
    """Human labels on the samples of these devices."""
    if not devices:
        return 0
    query = (
        select(func.count())
        .select_from(LabelRow)
        .join(SampleRow, SampleRow.msg_id == LabelRow.msg_id)
        .where(LabelRow.source == HUMAN, SampleRow.fleet_id == fleet, SampleRow.device_id.in_(devices))
    )
    async with registry.engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())
