"""The `improve_loops` table: one row per loop, claimed by one worker at a time with a lease (as
rollouts are: cloud_bridge/rollout/store.py), so several workers, or a restarted one, never run a
phase twice at once and always resume from the phase the row records."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, or_, select, update

from cloud_bridge.errors import BridgeError
from cloud_bridge.registry import ImproveLoopRow, Registry

RUNNING = "running"
FINAL_STATES = ("promoted", "rolled_back", "gate_failed", "failed", "aborted")
PHASES = ("dataset", "train", "gate", "rollout", "watch")


class ImproveError(BridgeError, ValueError):
    """A loop cannot be started or changed: the message says why and what to do."""


@dataclass(frozen=True)
class NewLoop:
    fleet_id: str
    devices: tuple[str, ...]
    base_name: str
    base_version: str
    options: dict[str, Any] = field(default_factory=dict)


class LoopStore:
    def __init__(self, registry: Registry) -> None:
        self.engine = registry.engine

    async def create(self, new: NewLoop, now: float | None = None) -> str:
        now = time.time() if now is None else now
        loop_id = str(uuid.uuid4())
        async with self.engine.begin() as conn:
            running = await conn.execute(
                select(ImproveLoopRow.id).where(
                    ImproveLoopRow.fleet_id == new.fleet_id,
                    ImproveLoopRow.base_name == new.base_name,
                    ImproveLoopRow.state == RUNNING,
                )
            )
            other = running.scalar()
            if other is not None:
                raise ImproveError(
                    f"loop {other} for {new.base_name} in fleet {new.fleet_id} is still running: "
                    f"wait for it or `cloud-bridge improve abort {other}` first"
                )
            await conn.execute(
                insert(ImproveLoopRow).values(
                    id=loop_id,
                    fleet_id=new.fleet_id,
                    devices=list(new.devices),
                    base_name=new.base_name,
                    base_version=new.base_version,
                    options=new.options,
                    phase=PHASES[0],
                    state=RUNNING,
                    history=[{"at": now, "phase": PHASES[0], "event": "started"}],
                    lease_until=0.0,
                    created_at=now,
                    updated_at=now,
                )
            )
        return loop_id

    async def get(self, loop_id: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(ImproveLoopRow.__table__).where(ImproveLoopRow.id == loop_id))).first()
        return None if row is None else dict(row._mapping)

    async def find(self, prefix: str) -> dict[str, Any]:
        """A loop by its id or a unique prefix of it."""
        async with self.engine.connect() as conn:
            rows = list(
                await conn.execute(select(ImproveLoopRow.__table__).where(ImproveLoopRow.id.startswith(prefix)))
            )
        if len(rows) != 1:
            what = "no loop" if not rows else f"{len(rows)} loops"
            raise ImproveError(f"{what} with id {prefix!r}: list them with `cloud-bridge improve status`")
        return dict(rows[0]._mapping)

    async def all(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(ImproveLoopRow.__table__).order_by(ImproveLoopRow.created_at))
            return [dict(r._mapping) for r in rows]

    async def active(self) -> list[str]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(ImproveLoopRow.id).where(ImproveLoopRow.state == RUNNING))
            return [str(r) for r in rows.scalars()]

    async def claim(self, loop_id: str, owner: str, now: float, lease_s: float) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(ImproveLoopRow)
                .where(
                    ImproveLoopRow.id == loop_id,
                    ImproveLoopRow.state == RUNNING,
                    or_(
                        ImproveLoopRow.owner.is_(None),
                        ImproveLoopRow.owner == owner,
                        ImproveLoopRow.lease_until < now,
                    ),
                )
                .values(owner=owner, lease_until=now + lease_s)
            )
            return result.rowcount == 1

    async def release(self, owner: str) -> None:
        """Hand back every lease `owner` holds (a worker stopping cleanly), so the next one goes on at once."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(ImproveLoopRow).where(ImproveLoopRow.owner == owner).values(owner=None, lease_until=0.0)
            )

    async def advance(self, loop_id: str, owner: str, event: str, now: float, **values: Any) -> bool:
        """Write a phase's outcome (only while `owner` holds the loop and it runs), appending to history."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    select(ImproveLoopRow.history).where(
                        ImproveLoopRow.id == loop_id, ImproveLoopRow.owner == owner, ImproveLoopRow.state == RUNNING
                    )
                )
            ).first()
            if row is None:
                return False
            entry = {"at": now, "event": event, **{k: v for k, v in values.items() if k in ("phase", "state")}}
            result = await conn.execute(
                update(ImproveLoopRow)
                .where(ImproveLoopRow.id == loop_id, ImproveLoopRow.owner == owner, ImproveLoopRow.state == RUNNING)
                .values(history=[*row.history, entry], updated_at=now, **values)
            )
            return result.rowcount == 1

    async def abort(self, loop_id: str, reason: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(ImproveLoopRow)
                .where(ImproveLoopRow.id == loop_id, ImproveLoopRow.state == RUNNING)
                .values(state="aborted", reason=reason, updated_at=now, owner=None)
            )
            return result.rowcount == 1
