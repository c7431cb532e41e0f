"""Canary rollouts: stage by stage, a model version reaches a growing share of a fleet, gated by telemetry.

`cloud-bridge rollout start` only inserts a rollout row (cloud_bridge/rollout/store.py), and whichever
bridge holds the row's lease drives it, here. All state is in the registry, so a bridge restart (or
another bridge taking over the lease) resumes where the last one stopped.

Lifecycle of a stage (`phase`):

1. deploying: pick the stage's devices (cloud_bridge/rollout/stages.py), send each a signed
   `model_update` through cloud_bridge/ota/commands.py, and follow their acks. Failures (rejected,
   health_failed, rolled_back, failed, or no final ack within `install_timeout_s`) over
   `max_install_failure_rate` roll back.
2. watching: once every device of the stage acked `done` (installed and through probation), compare
   the canary (rollout devices on the new model, telemetry from the moment watching began) with the
   control (fleet telemetry from any other model since `window_s` before the stage started: the rest
   of the fleet, plus the canary devices' own windows before they switched, which is what remains at
   a 100 % stage). cloud_bridge/rollout/policy.py judges: a crossed threshold rolls back at once,
   a full window within limits promotes, too little data holds.
3. promote: next stage, or the end: `promoted` when the last stage is 100 %, else `done`.
   Roll back: `rolled_back` with the reason (metric, canary vs control values), and a `rollback`
   command to every device of the rollout that may run the new model.

Commands are sent after their device row is written and the row records the cmd_id after the
publish, so a crash in between resends (a device receiving the same update twice keeps the model it
has).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from cloud_bridge.config import RolloutConfig
from cloud_bridge.errors import MqttError
from cloud_bridge.models.store import ModelRecord
from cloud_bridge.ota.commands import Action
from cloud_bridge.registry import Registry
from cloud_bridge.rollout.policy import (
    INSTALL_FAILED,
    INSTALL_OK,
    THRESHOLD_NAMES,
    Decision,
    GroupStats,
    Thresholds,
    install_outcome,
    judge_install,
    judge_window,
    thresholds_for,
)
from cloud_bridge.rollout.records import STATE_CODES as STATE_CODES  # re-exported
from cloud_bridge.rollout.records import STATES as STATES  # re-exported
from cloud_bridge.rollout.records import eval_record, rollout_line, stage_tag
from cloud_bridge.rollout.sending import Sender, few, send_commands
from cloud_bridge.rollout.shadow import ShadowStage
from cloud_bridge.rollout.stages import FleetDevice, is_shadow, select_stage
from cloud_bridge.rollout.store import RolloutStore
from cloud_bridge.tsdb import TsdbWriter

log = logging.getLogger(__name__)

# Device row states after which the device may run (or soon run) the new model: rollback targets.
_MAY_RUN_NEW = frozenset({"sent", "received", "downloading", "verifying", "installing", "installed", "done"})
_TERMINAL = INSTALL_OK | INSTALL_FAILED | {"cancelled"}


class ModelLookup(Protocol):
    async def get(self, name: str, version: str) -> ModelRecord: ...


def thresholds_from(config: RolloutConfig) -> Thresholds:
    """The stage thresholds the `[rollout]` config section sets: every name Thresholds defines, read
    from the section by that name (the one adapter between the config and the policy)."""
    return Thresholds(**{name: getattr(config, name) for name in THRESHOLD_NAMES})


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
        self._base = thresholds_from(config)
        self.owner = owner
        self._tsdb = tsdb
        self._clock = clock
        self._stop = asyncio.Event()
        self._warned_no_sender = False
        self.ticks = 0
        self.errors = 0
        self._shadow = ShadowStage(self)

    # What the shadow stage (cloud_bridge/rollout/shadow.py) uses of the driver.
    @property
    def sender(self) -> Sender | None:
        return self._sender

    @property
    def models(self) -> ModelLookup:
        return self._models

    def clock(self) -> float:
        return self._clock()

    def evaluation(self, decision: Decision, now: float, extra: dict[str, float]) -> dict[str, Any]:
        return eval_record(decision, now, None, None, extra)

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
        if is_shadow(pct):
            if rollout["phase"] == "deploying":
                await self._shadow.deploy(rollout, thresholds)
            elif rollout["phase"] == "watching":
                await self._shadow.watch(rollout, thresholds)
        elif rollout["phase"] == "deploying":
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
        fleet = await self.store.fleet(fleet_id)
        picked = select_stage(rid, fleet, already, rollout["model_sha256"], pct)
        if not picked and not devices:
            await self.nobody(rollout, fleet)
            return
        if picked:
            await self.store.add_devices(rid, fleet_id, stage, picked)
            log.info("rollout %s stage %d%% selected devices=%s", rid, pct, few(d.device_id for d in picked))
            devices = await self.store.devices(rid)
        selected = [row for row in devices if row["state"] == "selected"]
        if selected:
            record = await self._models.get(rollout["model_name"], rollout["model_version"])
            running = {d.device_id: d.model_sha256 for d in fleet}  # each gets the patch from its model
            targets = [(row["device_id"], running.get(row["device_id"])) for row in selected]
            commands = await self._sender.build_many(
                fleet_id, "model_update", targets, record, rollout_id=rid, stage=stage
            )
            await send_commands(self.store, self._sender, rid, selected, commands, "cmd_id", state="sent")
        await self.refresh(rid, devices)
        now = self._clock()
        stage_rows = [d for d in devices if d["stage"] == stage]
        await self.expire(rollout, stage_rows, now)
        decision = judge_install(install_outcome(d["state"] for d in stage_rows), t)
        if decision.verdict == "rollback":
            await self.rollback(rollout, decision, now)
        elif decision.verdict == "wait":
            await self.record(rollout, decision, now, len(devices))
        else:
            log.info("rollout %s stage %d%% installed on %d devices: watching", rid, pct, len(stage_rows))
            await self.store.update(
                rid, self.owner, phase="watching", watch_from=now, updated_at=now, reason=decision.reason
            )

    async def expire(self, rollout: dict[str, Any], stage_rows: list[dict[str, Any]], now: float) -> None:
        """Rows of the stage without a final ack within install_timeout_s become "timeout"."""
        if now - rollout["stage_started_at"] > self._config.install_timeout_s:
            change = {
                "state": "timeout",
                "reason": f"no final ack within install_timeout_s={self._config.install_timeout_s:g}",
            }
            late = [row for row in stage_rows if row["state"] not in _TERMINAL]
            await self.store.update_devices(rollout["id"], [(row["device_id"], change) for row in late])
            for row in late:
                row.update(change)

    async def nobody(self, rollout: dict[str, Any], fleet: list[FleetDevice]) -> None:
        """No device was ever picked and none can be now: end the rollout with the reason, rather than
        wait for devices that may never come (`rollout status` shows it; start another later)."""
        target = f"{rollout['model_name']} {rollout['model_version']}"
        fleet_id = rollout["fleet_id"]
        needing = [d for d in fleet if d.model_sha256 != rollout["model_sha256"]]
        if not fleet:
            reason = f"nothing to update: the registry knows no device of fleet {fleet_id}"
        elif not needing:
            reason = f"nothing to update: all {len(fleet)} devices of fleet {fleet_id} already run {target}"
        else:
            reason = (
                f"nothing to update now: none of the {len(needing)} devices of fleet {fleet_id} that do not run "
                f"{target} is online; start the rollout again once they are"
            )
        now = self._clock()
        values: dict[str, Any] = {"state": "done", "phase": "finished", "finished_at": now}
        log.warning("rollout %s ended: %s", rollout["id"], reason)
        if await self.store.update(
            rollout["id"],
            self.owner,
            reason=reason,
            last_eval=eval_record(Decision("wait", reason), now, None, None),
            updated_at=now,
            **values,
        ):
            self.emit({**rollout, **values}, 0, None, None, now)

    async def refresh(self, rollout_id: str, devices: list[dict[str, Any]]) -> None:
        """Copy each device's latest ack state for its update command into its row (one read, one write)."""
        waiting = {d["device_id"]: d for d in devices if d["cmd_id"] is not None and d["state"] not in _TERMINAL}
        if not waiting:
            return
        changes: list[tuple[str, dict[str, Any]]] = []
        for device_id, (state, reason) in (await self.store.latest_acks(rollout_id, _TERMINAL)).items():
            row = waiting.get(device_id)
            if row is not None and state != row["state"]:
                changes.append((device_id, {"state": state, "reason": reason}))
                row.update(state=state, reason=reason)
        await self.store.update_devices(rollout_id, changes)

    # -- watching --
    async def _watch(self, rollout: dict[str, Any], t: Thresholds) -> None:
        devices = await self.store.devices(rollout["id"])
        await self.refresh(rollout["id"], devices)
        now = self._clock()
        # Canary: the rollout's devices in state "done", as refresh() just wrote them.
        canary, control = await self.store.group_stats(rollout)
        elapsed = now >= float(rollout["watch_from"]) + float(rollout["window_s"])
        decision = judge_window(canary, control, t, window_elapsed=elapsed)
        if decision.verdict == "rollback":
            await self.rollback(rollout, decision, now, canary, control)
        elif decision.verdict == "promote":
            await self._advance(rollout, decision, now, len(devices), canary, control)
        else:
            await self.record(rollout, decision, now, len(devices), canary, control)

    async def record(
        self,
        rollout: dict[str, Any],
        decision: Decision,
        now: float,
        devices: int,
        canary: GroupStats | None = None,
        control: GroupStats | None = None,
        extra: dict[str, float] | None = None,
    ) -> None:
        evaluation = eval_record(decision, now, canary, control, extra)
        previous = rollout.get("last_eval") or {}
        if (previous.get("verdict"), previous.get("reason", "")[:40]) != (decision.verdict, decision.reason[:40]):
            # Logged on change only: a stage may wait or hold for many ticks.
            log.info("rollout %s %s: %s", rollout["id"], decision.verdict, decision.reason)
        reason = decision.reason if decision.verdict == "hold" else rollout["reason"]
        await self.store.update(rollout["id"], self.owner, last_eval=evaluation, updated_at=now, reason=reason)
        self.emit(rollout, devices, canary, control, now, extra)

    def emit(
        self,
        rollout: dict[str, Any],
        devices: int,
        canary: GroupStats | None,
        control: GroupStats | None,
        now: float,
        extra: dict[str, float] | None = None,
    ) -> None:
        if self._tsdb is None:
            return
        metrics: dict[str, float] = dict(extra or {})
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
        evaluation = eval_record(decision, now, canary, control)
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
            self.emit({**rollout, **values, "state": state}, devices, canary, control, now)

    # -- rolling back --
    async def rollback(
        self,
        rollout: dict[str, Any],
        decision: Decision,
        now: float,
        canary: GroupStats | None = None,
        control: GroupStats | None = None,
        extra: dict[str, float] | None = None,
    ) -> None:
        rid = rollout["id"]
        stage = stage_tag(rollout["stages"][rollout["stage"]])
        log.warning("rollout %s rolled back at stage %s%%: %s", rid, stage, decision.reason)
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
            last_eval=eval_record(decision, now, canary, control, extra),
            updated_at=now,
            **values,
        ):
            return
        updated = {**rollout, **values}
        self.emit(updated, len(await self.store.devices(rid)), canary, control, now, extra)
        await self._send_rollbacks(updated)

    async def _send_rollbacks(self, rollout: dict[str, Any]) -> None:
        """Send `rollback` to every device of the rollout that may run the new model (once each)."""
        rid, fleet_id = rollout["id"], rollout["fleet_id"]
        if self._sender is None:
            log.error("rollout %s cannot send rollback commands: set [ota] signing_key", rid)
            return
        rows = [row for row in await self.store.devices(rid) if row["rollback_cmd_id"] is None]
        await self.store.update_devices(
            rid, [(r["device_id"], {"state": "cancelled"}) for r in rows if r["state"] == "selected"]
        )
        back = [row for row in rows if row["state"] in _MAY_RUN_NEW]
        # A shadow never replaced the active model: stopping it is the whole way back.
        stop = [row for row in back if is_shadow(rollout["stages"][row["stage"]])]
        rest = [row for row in back if not is_shadow(rollout["stages"][row["stage"]])]
        actions: tuple[tuple[Action, list[dict[str, Any]]], ...] = (("shadow_stop", stop), ("rollback", rest))
        for action, group in actions:
            if group:
                targets = [(row["device_id"], None) for row in group]
                commands = await self._sender.build_many(fleet_id, action, targets, rollout_id=rid)
                await send_commands(self.store, self._sender, rid, group, commands, "rollback_cmd_id")
        await self.store.update(rid, self.owner, expect_state=None, rollback_pending=False)
        log.info("rollout %s rollback commands sent=%d", rid, len(back))
