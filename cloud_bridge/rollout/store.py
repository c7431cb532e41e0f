"""The rollout tables (`rollouts`, `rollout_devices`), and the fleet tables the driver reads.

A rollout is a `rollouts` row plus one `rollout_devices` row per device it took
(cloud_bridge/registry/tables.py). Exactly one bridge drives a rollout: each tick it claims the row
with `UPDATE ... SET owner = me, lease_until = now + lease_s WHERE id = ? AND (owner IS NULL OR
owner = me OR lease_until < now)`, and every later write is conditional on still being the owner.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    JSON,
    Table,
    and_,
    bindparam,
    case,
    delete,
    distinct,
    func,
    not_,
    or_,
    select,
    type_coerce,
    update,
)

from cloud_bridge.errors import RolloutError
from cloud_bridge.models.store import ModelRecord
from cloud_bridge.registry import CommandAckRow, Device, Registry, RolloutDeviceRow, RolloutRow, TelemetryRow
from cloud_bridge.registry.telemetry_stats import has_old_rows, windows
from cloud_bridge.rollout.policy import GroupStats
from cloud_bridge.rollout.stages import FleetDevice


@dataclass(frozen=True)
class NewRollout:
    fleet_id: str
    model: ModelRecord
    stages: tuple[int, ...]
    window_s: float
    thresholds: dict[str, dict[str, float]]
    control: str = "fleet"  # one of CONTROLS


def _row(result: Any) -> dict[str, Any]:
    return dict(result._mapping)


_CANARY, _CONTROL = "canary", "control"
# What a watched stage's canary is compared with. "fleet": telemetry of every device on another
# model (the rest of the fleet, and the canary devices' own windows before they switched) -- right
# when the fleet's devices see alike inputs. "devices": the canary devices' own windows before they
# switched, only -- right for a model made for a cohort (an improvement loop's: a drifted device,
# recovered, stays less sure than clean devices on clean inputs, and is judged against its past).
CONTROLS = ("fleet", "devices")  # with "devices" a stage judges the devices it switched, before/after


def _group(values: Sequence[Any]) -> GroupStats:
    """A GroupStats from group_stats's columns (sums are NULL over no rows, and come back as Decimal
    from PostgreSQL's sum of integers: int() them)."""
    devices, windows, inferences, rejected, sent, answered, agreed, conf_sum, conf_n, lat_sum, lat_n = values
    return GroupStats(
        devices=int(devices),
        windows=int(windows),
        inferences=int(inferences or 0),
        rejected=int(rejected or 0),
        escalations=int(sent or 0),
        answered=int(answered or 0),
        agreed=int(agreed or 0),
        confidence_mean=float(conf_sum) / float(conf_n) if conf_n else None,
        latency_p95_ms=float(lat_sum) / float(lat_n) if lat_n else None,
    )


class RolloutStore:
    """The rollout tables, and the fleet tables the driver reads."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._engine = registry.engine
        # Declarative tables are typed as FromClause; they are Tables, which insert/update need.
        self._rollouts = cast(Table, RolloutRow.__table__)
        self._devices = cast(Table, RolloutDeviceRow.__table__)

    async def create(self, new: NewRollout, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if new.control not in CONTROLS:
            raise RolloutError(f"control {new.control!r} is not one of {', '.join(CONTROLS)}")
        rollout_id = str(uuid.uuid4())
        async with self._engine.begin() as conn:
            running = await conn.execute(
                select(self._rollouts.c.id).where(
                    self._rollouts.c.fleet_id == new.fleet_id,
                    self._rollouts.c.model_name == new.model.name,
                    self._rollouts.c.state == "running",
                )
            )
            other = running.scalar()
            if other is not None:
                raise RolloutError(
                    f"rollout {other} of {new.model.name} in fleet {new.fleet_id} is still running: "
                    f"wait for it or `cloud-bridge rollout abort {other}` first"
                )
            await conn.execute(
                self._rollouts.insert().values(
                    id=rollout_id,
                    fleet_id=new.fleet_id,
                    model_name=new.model.name,
                    model_version=new.model.version,
                    model_sha256=new.model.sha256,
                    stages=list(new.stages),
                    stage=0,
                    phase="deploying",
                    state="running",
                    reason=None,
                    thresholds=new.thresholds,
                    window_s=new.window_s,
                    control=new.control,
                    created_at=now,
                    updated_at=now,
                    stage_started_at=now,
                    owner=None,
                    lease_until=0.0,
                    rollback_pending=False,
                )
            )
        return rollout_id

    async def get(self, rollout_id: str) -> dict[str, Any] | None:
        async with self._engine.connect() as conn:
            result = await conn.execute(select(self._rollouts).where(self._rollouts.c.id == rollout_id))
            row = result.first()
        return None if row is None else _row(row)

    async def all(self) -> list[dict[str, Any]]:
        async with self._engine.connect() as conn:
            result = await conn.execute(select(self._rollouts).order_by(self._rollouts.c.created_at))
            return [_row(r) for r in result]

    async def active(self) -> list[dict[str, Any]]:
        """Rollouts with work to do: running, or with rollback commands still to send."""
        async with self._engine.connect() as conn:
            result = await conn.execute(
                select(self._rollouts).where(
                    or_(self._rollouts.c.state == "running", self._rollouts.c.rollback_pending.is_(True))
                )
            )
            return [_row(r) for r in result]

    async def claim(self, rollout_id: str, owner: str, now: float, lease_s: float) -> bool:
        """Take or renew the lease; False while another live bridge holds it."""
        t = self._rollouts
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(t)
                .where(t.c.id == rollout_id, or_(t.c.owner.is_(None), t.c.owner == owner, t.c.lease_until < now))
                .values(owner=owner, lease_until=now + lease_s)
            )
            return bool(result.rowcount == 1)

    async def release(self, owner: str) -> None:
        t = self._rollouts
        async with self._engine.begin() as conn:
            await conn.execute(update(t).where(t.c.owner == owner).values(owner=None, lease_until=0.0))

    async def update(self, rollout_id: str, owner: str, *, expect_state: str | None = "running", **values: Any) -> bool:
        """Change the row if this bridge still owns it (and it is still in `expect_state`)."""
        t = self._rollouts
        stmt = update(t).where(t.c.id == rollout_id, t.c.owner == owner)
        if expect_state is not None:
            stmt = stmt.where(t.c.state == expect_state)
        async with self._engine.begin() as conn:
            result = await conn.execute(stmt.values(**values))
            return bool(result.rowcount == 1)

    async def abort(self, rollout_id: str, reason: str, rollback: bool, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        t = self._rollouts
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(t)
                .where(t.c.id == rollout_id, t.c.state == "running")
                .values(
                    state="aborted",
                    phase="finished",
                    reason=reason,
                    finished_at=now,
                    updated_at=now,
                    rollback_pending=rollback,
                )
            )
            return bool(result.rowcount == 1)

    async def devices(self, rollout_id: str) -> list[dict[str, Any]]:
        async with self._engine.connect() as conn:
            result = await conn.execute(
                select(self._devices).where(self._devices.c.rollout_id == rollout_id).order_by(self._devices.c.stage)
            )
            return [_row(r) for r in result]

    async def add_devices(self, rollout_id: str, fleet_id: str, stage: int, picked: Sequence[FleetDevice]) -> None:
        now = time.time()
        rows = [
            {
                "rollout_id": rollout_id,
                "device_id": d.device_id,
                "fleet_id": fleet_id,
                "stage": stage,
                "previous_name": d.model_name,
                "previous_version": d.model_version,
                "previous_sha256": d.model_sha256,
                "cmd_id": None,
                "state": "selected",
                "reason": None,
                "rollback_cmd_id": None,
                "updated_at": now,
            }
            for d in picked
        ]
        async with self._engine.begin() as conn:
            await conn.execute(self._devices.insert(), rows)

    async def update_device(self, rollout_id: str, device_id: str, **values: Any) -> None:
        await self.update_devices(rollout_id, [(device_id, values)])

    async def update_devices(self, rollout_id: str, changes: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Change many device rows of a rollout in one transaction, one statement per set of columns
        changed (executemany): a stage of 10,000 devices was 10,000 transactions one after another."""
        t = self._devices
        by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        now = time.time()
        for device_id, values in changes:
            params = {f"v_{k}": v for k, v in values.items()}
            by_columns.setdefault(tuple(sorted(values)), []).append(
                {"k_device": device_id, "v_updated_at": now, **params}
            )
        if not by_columns:
            return
        async with self._engine.begin() as conn:
            for columns, rows in by_columns.items():
                stmt = (
                    update(t)
                    .where(t.c.rollout_id == rollout_id, t.c.device_id == bindparam("k_device"))
                    .values({c: bindparam(f"v_{c}") for c in (*columns, "updated_at")})
                )
                await conn.execute(stmt, rows)

    async def latest_acks(self, rollout_id: str, final: Collection[str]) -> dict[str, tuple[str, str | None]]:
        """device_id -> (state, reason) of the latest ack of each device's command (`cmd_id`), for the
        rollout's rows not yet in a `final` state: one statement (the latest by ack time, then msg_id,
        as ota/commands.py `command_states` picks it)."""
        d, a = self._devices, cast(Table, CommandAckRow.__table__)
        ranked = (
            select(
                d.c.device_id,
                a.c.state,
                a.c.reason,
                func.row_number()
                .over(partition_by=a.c.cmd_id, order_by=(a.c.ts.desc(), a.c.msg_id.desc()))
                .label("rk"),
            )
            .select_from(d)
            .join(a, and_(a.c.cmd_id == d.c.cmd_id, a.c.device_id == d.c.device_id, a.c.fleet_id == d.c.fleet_id))
            .where(d.c.rollout_id == rollout_id, d.c.cmd_id.is_not(None), d.c.state.not_in(sorted(final)))
            .subquery()
        )
        query = select(ranked.c.device_id, ranked.c.state, ranked.c.reason).where(ranked.c.rk == 1)
        async with self._engine.connect() as conn:
            return {r.device_id: (str(r.state), r.reason) for r in await conn.execute(query)}

    async def fleet(self, fleet_id: str) -> list[FleetDevice]:
        t = Device.__table__
        async with self._engine.connect() as conn:
            result = await conn.execute(select(t).where(t.c.fleet_id == fleet_id))
            return [
                FleetDevice(r.device_id, bool(r.online), r.model_name, r.model_version, r.model_sha256) for r in result
            ]

    async def fleets(self) -> list[str]:
        t = Device.__table__
        async with self._engine.connect() as conn:
            result = await conn.execute(select(t.c.fleet_id).distinct())
            return sorted(str(f) for f in result.scalars())

    async def group_stats(self, rollout: dict[str, Any]) -> tuple[GroupStats, GroupStats]:
        """The canary and control telemetry of a watched stage (stages.py `split_groups` says which
        windows are which), summed in SQL: one statement, one row per group, whatever the fleet's size.

        Canary devices are the rollout's rows in state "done" (the driver refreshed them from their
        acks just before). The control is every other model's windows, or with the rollout's
        `control` "devices" only the canary devices' own, the canary then being the devices this
        stage switched (CONTROLS). The weighted means are sums of
        mean x count over sums of count, taken over the windows that have the mean, as
        policy.aggregate weighs them."""
        d = self._devices
        watch_from = float(rollout["watch_from"])
        control_from = float(rollout["stage_started_at"]) - float(rollout["window_s"])
        since, fleet_id = min(watch_from, control_from), rollout["fleet_id"]
        async with self._engine.connect() as conn:
            w = windows(since, fleet_id, old_rows=await has_old_rows(conn, since, fleet_id))
            target = and_(w.c.model_name == rollout["model_name"], w.c.model_version == rollout["model_version"])
            done = [d.c.rollout_id == rollout["id"], d.c.state == "done"]
            own: list[Any] = []
            if rollout.get("control") == "devices":
                # Before and after of the devices this stage switched: those of earlier stages have no
                # windows before their switch in this stage's control range (they were judged then).
                done.append(d.c.stage == rollout["stage"])
                own = [w.c.device_id.in_(select(d.c.device_id).where(*done))]
            canary_ids = select(d.c.device_id).where(*done)
            group = case(
                (and_(w.c.window_end >= watch_from, target, w.c.device_id.in_(canary_ids)), _CANARY),
                (and_(w.c.window_end >= control_from, not_(target), *own), _CONTROL),
            ).label("grp")
            n, confidence, latency = w.c.count, w.c.confidence_mean, w.c.latency_p95_ms
            query = select(
                group,
                func.count(distinct(w.c.device_id)),
                func.count(),
                func.sum(n),
                func.sum(w.c.rejected),
                func.sum(w.c.escalations_sent),
                func.sum(w.c.escalations_answered),
                func.sum(w.c.escalations_agreed),
                func.sum(confidence * n),
                func.sum(case((confidence.is_not(None), n))),
                func.sum(latency * n),
                func.sum(case((latency.is_not(None), n))),
            ).group_by(group)
            found = {r[0]: _group(r[1:]) for r in await conn.execute(query)}
        return found.get(_CANARY, GroupStats()), found.get(_CONTROL, GroupStats())

    async def telemetry(self, fleet_id: str, since: float) -> list[dict[str, Any]]:
        """Telemetry rows (device_id, model_name, model_version, window_end, body) since `since`; `body`
        is the row's summary (the fields the judge reads) where it has one, else the whole body.

        The judge's reading before `group_stats` (every window into Python, then stages.split_groups):
        kept as the reference that the SQL sums are tested against, and for bench/queries.py."""
        t = TelemetryRow.__table__
        # The summary, not the ~3 KB body: at 10,000 devices a 10-minute window is 600,000 rows.
        body = type_coerce(func.coalesce(t.c.summary, t.c.body), JSON).label("body")
        query = select(t.c.device_id, t.c.model_name, t.c.model_version, t.c.window_end, body).where(
            t.c.window_end >= since, t.c.fleet_id == fleet_id
        )
        async with self._engine.connect() as conn:
            return [_row(r) for r in await conn.execute(query)]

    async def bodies(self, fleet_id: str, device_ids: Sequence[str], since: float) -> list[dict[str, Any]]:
        """Whole telemetry bodies of a few devices since `since` (a shadow stage reads their `shadow`
        field, which the summary leaves out)."""
        t = TelemetryRow.__table__
        query = select(t.c.body).where(t.c.window_end >= since, t.c.fleet_id == fleet_id, t.c.device_id.in_(device_ids))
        async with self._engine.connect() as conn:
            return [dict(r.body) for r in await conn.execute(query)]

    async def end_shadow(self, rollout_id: str, owner: str, shadow_stage: int, **values: Any) -> bool:
        """In one transaction: forget the shadow stage's device rows (the canary stages pick devices
        afresh) and move the rollout on, if this bridge still owns it and it is still running."""
        t = self._rollouts
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(t).where(t.c.id == rollout_id, t.c.owner == owner, t.c.state == "running").values(**values)
            )
            if result.rowcount != 1:
                return False  # nothing was changed
            d = self._devices
            await conn.execute(delete(d).where(d.c.rollout_id == rollout_id, d.c.stage == shadow_stage))
            return True
