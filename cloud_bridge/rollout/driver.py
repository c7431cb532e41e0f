"""Canary rollouts: stage by stage, a model version reaches a growing share of a fleet, gated by telemetry.

A rollout is a `rollouts` row plus one `rollout_devices` row per device it took (cloud_bridge/registry/registry.py);
`cloud-bridge rollout start` only inserts the row, and whichever bridge holds the row's lease drives it.
All state is in the registry, so a bridge restart (or another bridge taking over the lease) resumes
where the last one stopped.

Lifecycle of a stage (`phase`):

1. deploying: pick the stage's devices (below), send each a signed `model_update` through
   cloud_bridge/ota/commands.py, and follow their acks. Failures (rejected, health_failed, rolled_back,
   failed, or no final ack within `install_timeout_s`) over `max_install_failure_rate` roll back.
2. watching: once every device of the stage acked `done` (installed and through probation), compare
   the canary (rollout devices on the new model, telemetry from the moment watching began) with the
   control (fleet telemetry from any other model since `window_s` before the stage started: the rest
   of the fleet, plus the canary devices' own windows before they switched, which is what remains at
   a 100 % stage). cloud_bridge/rollout/policy.py judges: a crossed threshold rolls back at once,
   a full window within limits promotes, too little data holds.
3. promote: next stage, or the end: `promoted` when the last stage is 100 %, else `done`.
   Roll back: `rolled_back` with the reason (metric, canary vs control values), and a `rollback`
   command to every device of the rollout that may run the new model.

Device selection is deterministic: the fleet's devices (those already on the new model before the
rollout are left out) sorted by sha256(rollout_id + device_id), and the first ceil(pct * N / 100) of
them, cumulative across stages. Offline devices (registry `devices.online`) are skipped and the next
in order is taken; a stage with fewer online devices than its share proceeds with those it has.

Exactly one bridge drives a rollout: each tick it claims the row with
`UPDATE ... SET owner = me, lease_until = now + lease_s WHERE id = ? AND (owner IS NULL OR owner = me
OR lease_until < now)` and every later write is conditional on still being the owner. Commands are
sent after their device row is written and the row records the cmd_id after the publish, so a crash in
between resends (a device receiving the same update twice keeps the model it has).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from sqlalchemy import Table, or_, select, update

from cloud_bridge.config import RolloutConfig
from cloud_bridge.errors import MqttError, RolloutError
from cloud_bridge.models.store import ModelRecord
from cloud_bridge.ota.commands import command_states
from cloud_bridge.registry import Device, Registry, RolloutDeviceRow, RolloutRow, TelemetryRow
from cloud_bridge.rollout.policy import (
    INSTALL_FAILED,
    INSTALL_OK,
    THRESHOLD_NAMES,
    Decision,
    GroupStats,
    Thresholds,
    aggregate,
    install_outcome,
    judge_install,
    judge_window,
    thresholds_for,
)
from cloud_bridge.tsdb.lines import FieldValue, TsdbWriter, line
from schemas.messages import Command

log = logging.getLogger(__name__)

STATES = ("running", "promoted", "done", "rolled_back", "aborted")
# Numeric codes for the TSDB `state` field (Grafana state timelines map them back to names).
STATE_CODES = {name: code for code, name in enumerate(STATES, start=1)}
# Device row states after which the device may run (or soon run) the new model: rollback targets.
_MAY_RUN_NEW = frozenset({"sent", "received", "downloading", "verifying", "installing", "installed", "done"})
_TERMINAL = INSTALL_OK | INSTALL_FAILED | {"cancelled"}


class Sender(Protocol):
    """What the driver needs of cloud_bridge.ota.commands.CommandSender."""

    async def send_update(
        self,
        fleet_id: str,
        device_id: str,
        record: ModelRecord,
        *,
        rollout_id: str | None = None,
        stage: int | None = None,
    ) -> Command: ...

    async def send_rollback(self, fleet_id: str, device_id: str, *, rollout_id: str | None = None) -> Command: ...


class ModelLookup(Protocol):
    async def get(self, name: str, version: str) -> ModelRecord: ...


# ---- selection ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FleetDevice:
    device_id: str
    online: bool
    model_name: str | None = None
    model_version: str | None = None
    model_sha256: str | None = None


def selection_key(rollout_id: str, device_id: str) -> str:
    return hashlib.sha256((rollout_id + device_id).encode()).hexdigest()


def stage_target(pct: int, fleet_size: int) -> int:
    """ceil(pct * N / 100) in integers (no float rounding at 100 %)."""
    return -(-pct * fleet_size // 100)


def select_stage(
    rollout_id: str, devices: Iterable[FleetDevice], already: set[str], target_sha: str, pct: int
) -> list[FleetDevice]:
    """The devices a stage adds: cumulative share `pct` of the eligible fleet, in hash order, online only."""
    eligible = [d for d in devices if d.model_sha256 != target_sha or d.device_id in already]
    wanted = stage_target(pct, len(eligible)) - len(already)
    picked: list[FleetDevice] = []
    for device in sorted(eligible, key=lambda d: selection_key(rollout_id, d.device_id)):
        if len(picked) >= wanted:
            break
        if device.device_id in already or not device.online:
            continue
        picked.append(device)
    return picked


# ---- persistence ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class NewRollout:
    fleet_id: str
    model: ModelRecord
    stages: tuple[int, ...]
    window_s: float
    thresholds: dict[str, dict[str, float]]


def parse_stages(text: str) -> tuple[int, ...]:
    try:
        stages = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise RolloutError(f"--stages {text!r} must be comma-separated percentages, e.g. 5,25,100") from None
    if not stages or any(not 1 <= s <= 100 for s in stages) or list(stages) != sorted(set(stages)):
        raise RolloutError(f"--stages {text!r} must be increasing percentages between 1 and 100, e.g. 5,25,100")
    return stages


def _row(result: Any) -> dict[str, Any]:
    return dict(result._mapping)


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
        t = self._devices
        async with self._engine.begin() as conn:
            await conn.execute(
                update(t)
                .where(t.c.rollout_id == rollout_id, t.c.device_id == device_id)
                .values(updated_at=time.time(), **values)
            )

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

    async def telemetry(self, fleet_id: str, since: float) -> list[dict[str, Any]]:
        """Telemetry rows (device_id, model_name, model_version, window_end, body) since `since`."""
        t = TelemetryRow.__table__
        query = select(t.c.device_id, t.c.model_name, t.c.model_version, t.c.window_end, t.c.body).where(
            t.c.window_end >= since, t.c.fleet_id == fleet_id
        )
        async with self._engine.connect() as conn:
            return [_row(r) for r in await conn.execute(query)]


# ---- the driver -----------------------------------------------------------------------------------
def base_thresholds(config: RolloutConfig) -> Thresholds:
    return Thresholds(**{name: getattr(config, name) for name in THRESHOLD_NAMES})


def rollout_line(rollout: dict[str, Any], devices: int, metrics: dict[str, float], now: float) -> str:
    stages: list[int] = rollout["stages"]
    tags = {
        "fleet": rollout["fleet_id"],
        "rollout": rollout["id"],
        "model": rollout["model_name"],
        "version": rollout["model_version"],
        "stage": str(stages[min(rollout["stage"], len(stages) - 1)]),
    }
    fields: dict[str, FieldValue] = {"devices": devices, "state": STATE_CODES[rollout["state"]]}
    fields.update(metrics)
    return line("rollout", tags, fields, round(now * 1000))


def split_groups(
    rows: Iterable[dict[str, Any]], rollout: dict[str, Any], canary_ids: set[str]
) -> tuple[GroupStats, GroupStats]:
    """Canary: rollout devices on the new model since watching began. Control: every other model's
    windows since `window_s` before the stage started."""
    target = (rollout["model_name"], rollout["model_version"])
    watch_from = float(rollout["watch_from"])
    control_from = float(rollout["stage_started_at"]) - float(rollout["window_s"])
    canary: list[dict[str, Any]] = []
    control: list[dict[str, Any]] = []
    for row in rows:
        is_target = (row["model_name"], row["model_version"]) == target
        if is_target and row["device_id"] in canary_ids and row["window_end"] >= watch_from:
            canary.append(row["body"])
        elif not is_target and row["window_end"] >= control_from:
            control.append(row["body"])
    return aggregate(canary), aggregate(control)


def _eval_record(
    decision: Decision, now: float, canary: GroupStats | None, control: GroupStats | None
) -> dict[str, Any]:
    return {
        "at": now,
        "verdict": decision.verdict,
        "reason": decision.reason,
        "canary": canary.metrics() if canary else {},
        "control": control.metrics() if control else {},
        "checks": [
            {"metric": c.metric, "canary": c.canary, "control": c.control, "limit": c.limit, "passed": c.passed}
            for c in decision.checks
        ],
    }


class RolloutDriver:
    """Drives every active rollout whose lease this bridge holds, one tick every `tick_s`."""

    def __init__(
        self,
        registry: Registry,
        models: ModelLookup,
        sender: Sender | None,
        config: RolloutConfig,
        owner: str,
        tsdb: TsdbWriter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = RolloutStore(registry)
        self._models = models
        self._sender = sender
        self._config = config
        self._base = base_thresholds(config)
        self.owner = owner
        self._tsdb = tsdb
        self._clock = clock
        self._stop = asyncio.Event()
        self._warned_no_sender = False
        self.ticks = 0
        self.errors = 0

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Tick until `close()` (from when `ready` is set: commands need the MQTT connection); then
        hand the leases back so another bridge can continue at once."""
        if ready is not None:
            waiter = asyncio.ensure_future(ready.wait())
            stopper = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
        while not self._stop.is_set():
            await self.tick()
            try:
                await asyncio.wait_for(self._stop.wait(), self._config.tick_s)
            except TimeoutError:
                continue
        await self.store.release(self.owner)
        log.info("rollout driver stopped owner=%s", self.owner)

    def close(self) -> None:
        self._stop.set()

    async def tick(self) -> None:
        for rollout in await self.store.active():
            now = self._clock()
            if not await self.store.claim(rollout["id"], self.owner, now, self._config.lease_s):
                continue
            try:
                await self.step(rollout["id"])
            except MqttError as exc:
                self.errors += 1
                log.warning("rollout %s: broker unavailable (%s); retrying next tick", rollout["id"], exc)
            except Exception:
                # One broken rollout (a model file gone, a DB hiccup) must not stop ingestion or the others.
                self.errors += 1
                log.exception("rollout step failed rollout=%s; retrying next tick", rollout["id"])
        self.ticks += 1

    async def step(self, rollout_id: str) -> None:
        rollout = await self.store.get(rollout_id)
        if rollout is None:
            return
        if rollout["rollback_pending"]:
            await self._send_rollbacks(rollout)
            return
        if rollout["state"] != "running":
            return
        if self._sender is None:
            if not self._warned_no_sender:
                log.error(
                    "rollout %s waits: OTA commands are disabled (set [ota] signing_key in the bridge config)",
                    rollout_id,
                )
                self._warned_no_sender = True
            return
        pct = rollout["stages"][rollout["stage"]]
        thresholds = thresholds_for(self._base, rollout["thresholds"], pct)
        if rollout["phase"] == "deploying":
            await self._deploy(rollout, thresholds)
        elif rollout["phase"] == "watching":
            await self._watch(rollout, thresholds)

    # -- deploying --
    async def _deploy(self, rollout: dict[str, Any], t: Thresholds) -> None:
        assert self._sender is not None
        rid, fleet_id, stage = rollout["id"], rollout["fleet_id"], rollout["stage"]
        pct = rollout["stages"][stage]
        devices = await self.store.devices(rid)
        already = {d["device_id"] for d in devices}
        picked = select_stage(rid, await self.store.fleet(fleet_id), already, rollout["model_sha256"], pct)
        if picked:
            await self.store.add_devices(rid, fleet_id, stage, picked)
            log.info("rollout %s stage %d%% selected devices=%s", rid, pct, ",".join(d.device_id for d in picked))
            devices = await self.store.devices(rid)
        for row in devices:
            if row["state"] == "selected":
                record = await self._models.get(rollout["model_name"], rollout["model_version"])
                command = await self._sender.send_update(
                    fleet_id, row["device_id"], record, rollout_id=rid, stage=stage
                )
                await self.store.update_device(rid, row["device_id"], cmd_id=command.cmd_id, state="sent")
                row.update(cmd_id=command.cmd_id, state="sent")
        await self._refresh(rid, devices)
        now = self._clock()
        stage_rows = [d for d in devices if d["stage"] == stage]
        if now - rollout["stage_started_at"] > self._config.install_timeout_s:
            for row in stage_rows:
                if row["state"] not in _TERMINAL:
                    reason = f"no final ack within install_timeout_s={self._config.install_timeout_s:g}"
                    await self.store.update_device(rid, row["device_id"], state="timeout", reason=reason)
                    row["state"] = "timeout"
        decision = judge_install(install_outcome(d["state"] for d in stage_rows), t)
        if decision.verdict == "rollback":
            await self._rollback(rollout, decision, now)
        elif decision.verdict == "wait" or not devices:
            reason = decision.reason if devices else "waiting: no online device of the fleet to update"
            await self._record(rollout, Decision("wait", reason), now, len(devices))
        else:
            log.info("rollout %s stage %d%% installed on %d devices: watching", rid, pct, len(stage_rows))
            await self.store.update(
                rid, self.owner, phase="watching", watch_from=now, updated_at=now, reason=decision.reason
            )

    async def _refresh(self, rollout_id: str, devices: list[dict[str, Any]]) -> None:
        """Copy each device's latest ack state for its update command into its row."""
        waiting = {d["cmd_id"]: d for d in devices if d["cmd_id"] is not None and d["state"] not in _TERMINAL}
        if not waiting:
            return
        for state in await command_states(self.store.registry, cmd_ids=list(waiting)):
            row = waiting[state.cmd_id]
            if state.state is not None and state.state != row["state"]:
                await self.store.update_device(rollout_id, row["device_id"], state=state.state, reason=state.reason)
                row.update(state=state.state, reason=state.reason)

    # -- watching --
    async def _watch(self, rollout: dict[str, Any], t: Thresholds) -> None:
        devices = await self.store.devices(rollout["id"])
        await self._refresh(rollout["id"], devices)
        now = self._clock()
        canary_ids = {d["device_id"] for d in devices if d["state"] == "done"}
        since = min(float(rollout["watch_from"]), float(rollout["stage_started_at"]) - float(rollout["window_s"]))
        rows = await self.store.telemetry(rollout["fleet_id"], since)
        canary, control = split_groups(rows, rollout, canary_ids)
        elapsed = now >= float(rollout["watch_from"]) + float(rollout["window_s"])
        decision = judge_window(canary, control, t, window_elapsed=elapsed)
        if decision.verdict == "rollback":
            await self._rollback(rollout, decision, now, canary, control)
        elif decision.verdict == "promote":
            await self._advance(rollout, decision, now, len(devices), canary, control)
        else:
            await self._record(rollout, decision, now, len(devices), canary, control)

    async def _record(
        self,
        rollout: dict[str, Any],
        decision: Decision,
        now: float,
        devices: int,
        canary: GroupStats | None = None,
        control: GroupStats | None = None,
    ) -> None:
        evaluation = _eval_record(decision, now, canary, control)
        previous = rollout.get("last_eval") or {}
        if (previous.get("verdict"), previous.get("reason", "")[:40]) != (decision.verdict, decision.reason[:40]):
            # Logged on change only: a stage may wait or hold for many ticks.
            log.info("rollout %s %s: %s", rollout["id"], decision.verdict, decision.reason)
        reason = decision.reason if decision.verdict == "hold" else rollout["reason"]
        await self.store.update(rollout["id"], self.owner, last_eval=evaluation, updated_at=now, reason=reason)
        self._emit(rollout, devices, canary, control, now)

    def _emit(
        self,
        rollout: dict[str, Any],
        devices: int,
        canary: GroupStats | None,
        control: GroupStats | None,
        now: float,
    ) -> None:
        if self._tsdb is None:
            return
        metrics: dict[str, float] = {}
        for prefix, group in (("canary_", canary), ("control_", control)):
            if group is not None:
                metrics.update({prefix + k: float(v) for k, v in group.metrics().items()})
        self._tsdb.add([rollout_line(rollout, devices, metrics, now)])

    async def _advance(
        self,
        rollout: dict[str, Any],
        decision: Decision,
        now: float,
        devices: int,
        canary: GroupStats,
        control: GroupStats,
    ) -> None:
        rid, stages, stage = rollout["id"], rollout["stages"], rollout["stage"]
        evaluation = _eval_record(decision, now, canary, control)
        if stage + 1 < len(stages):
            log.info(
                "rollout %s stage %d%% passed (%s): next stage %d%%",
                rid,
                stages[stage],
                decision.reason,
                stages[stage + 1],
            )
            values: dict[str, Any] = {
                "stage": stage + 1,
                "phase": "deploying",
                "stage_started_at": now,
                "watch_from": None,
            }
            state = "running"
        else:
            state = "promoted" if stages[-1] == 100 else "done"
            log.info("rollout %s %s at %d%%: %s", rid, state, stages[-1], decision.reason)
            values = {"state": state, "phase": "finished", "finished_at": now}
        if await self.store.update(
            rid, self.owner, last_eval=evaluation, updated_at=now, reason=decision.reason, **values
        ):
            self._emit({**rollout, **values, "state": state}, devices, canary, control, now)

    # -- rolling back --
    async def _rollback(
        self,
        rollout: dict[str, Any],
        decision: Decision,
        now: float,
        canary: GroupStats | None = None,
        control: GroupStats | None = None,
    ) -> None:
        rid = rollout["id"]
        log.warning(
            "rollout %s rolled back at stage %d%%: %s", rid, rollout["stages"][rollout["stage"]], decision.reason
        )
        values: dict[str, Any] = {
            "state": "rolled_back",
            "phase": "finished",
            "finished_at": now,
            "rollback_pending": True,
        }
        if not await self.store.update(
            rid,
            self.owner,
            reason=decision.reason,
            last_eval=_eval_record(decision, now, canary, control),
            updated_at=now,
            **values,
        ):
            return
        updated = {**rollout, **values}
        self._emit(updated, len(await self.store.devices(rid)), canary, control, now)
        await self._send_rollbacks(updated)

    async def _send_rollbacks(self, rollout: dict[str, Any]) -> None:
        """Send `rollback` to every device of the rollout that may run the new model (once each)."""
        rid, fleet_id = rollout["id"], rollout["fleet_id"]
        if self._sender is None:
            log.error("rollout %s cannot send rollback commands: set [ota] signing_key", rid)
            return
        sent = 0
        for row in await self.store.devices(rid):
            if row["rollback_cmd_id"] is not None:
                continue
            if row["state"] == "selected":
                await self.store.update_device(rid, row["device_id"], state="cancelled")
            elif row["state"] in _MAY_RUN_NEW:
                command = await self._sender.send_rollback(fleet_id, row["device_id"], rollout_id=rid)
                await self.store.update_device(rid, row["device_id"], rollback_cmd_id=command.cmd_id)
                sent += 1
        await self.store.update(rid, self.owner, expect_state=None, rollback_pending=False)
        log.info("rollout %s rollback commands sent=%d", rid, sent)
