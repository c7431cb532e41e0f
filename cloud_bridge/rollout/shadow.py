"""The shadow stage of a rollout, driven: `--stages shadow:PCT,...` (stored as -PCT, first).

1. deploying: pick PCT % of the fleet like a canary stage (cloud_bridge/rollout/stages.py) and send
   each a signed `shadow_start` carrying the candidate (cloud_bridge/ota/commands.py); the device
   fetches and verifies it like an update but runs it beside its active model, never in a slot
   (edge_node/ota/shadow.py). "done" acks mean it runs; failures over max_install_failure_rate fail.
2. watching: the `shadow` field of those devices' telemetry since watching began, judged by
   cloud_bridge/rollout/shadow_policy.py against the active model on the same devices.
3. pass: `shadow_stop` to every shadow device, then, in one transaction, the stage's device rows are
   dropped (the canary stages pick afresh) and the rollout moves to its next stage (or ends `done`).
   Fail: the rollout ends `rolled_back` through the driver's usual path, whose rollback commands are
   `shadow_stop` for shadow rows: no device ever got a `model_update` of the candidate.

Stops are sent before the row changes, so a crash in between only sends them again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from cloud_bridge.rollout.policy import Decision, GroupStats, Thresholds, aggregate, install_outcome, judge_install
from cloud_bridge.rollout.sending import few, send_commands
from cloud_bridge.rollout.shadow_policy import aggregate_shadow, judge_shadow
from cloud_bridge.rollout.stages import select_stage, stage_pct

if TYPE_CHECKING:
    from cloud_bridge.rollout.driver import RolloutDriver

log = logging.getLogger(__name__)


class ShadowStage:
    """The shadow-stage half of a RolloutDriver (it reuses the driver's acks, records and rollback)."""

    def __init__(self, driver: RolloutDriver) -> None:
        self.d = driver

    async def deploy(self, rollout: dict[str, Any], t: Thresholds) -> None:
        d = self.d
        sender = d.sender
        assert sender is not None
        rid, fleet_id, stage = rollout["id"], rollout["fleet_id"], rollout["stage"]
        pct = stage_pct(rollout["stages"][stage])
        devices = await d.store.devices(rid)
        fleet = await d.store.fleet(fleet_id)
        picked = select_stage(rid, fleet, {r["device_id"] for r in devices}, rollout["model_sha256"], pct)
        if not picked and not devices:
            await d.nobody(rollout, fleet)
            return
        if picked:
            await d.store.add_devices(rid, fleet_id, stage, picked)
            log.info("rollout %s shadow %d%% selected devices=%s", rid, pct, few(p.device_id for p in picked))
            devices = await d.store.devices(rid)
        selected = [row for row in devices if row["state"] == "selected"]
        if selected:
            record = await d.models.get(rollout["model_name"], rollout["model_version"])
            targets = [(row["device_id"], None) for row in selected]
            commands = await sender.build_many(fleet_id, "shadow_start", targets, record, rollout_id=rid, stage=stage)
            await send_commands(d.store, sender, rid, selected, commands, "cmd_id", state="sent")
        await d.refresh(rid, devices)
        now = d.clock()
        await d.expire(rollout, devices, now)
        decision = judge_install(install_outcome(r["state"] for r in devices), t)
        if decision.verdict == "rollback":
            await d.rollback(rollout, decision, now)
        elif decision.verdict == "wait":
            await d.record(rollout, decision, now, len(devices))
        else:
            log.info("rollout %s shadow running on %d devices: watching", rid, len(devices))
            await d.store.update(rid, d.owner, phase="watching", watch_from=now, updated_at=now, reason=decision.reason)

    async def watch(self, rollout: dict[str, Any], t: Thresholds) -> None:
        d = self.d
        rid = rollout["id"]
        devices = await d.store.devices(rid)
        now = d.clock()
        running = [r["device_id"] for r in devices if r["state"] == "done"]
        bodies = await d.store.bodies(rollout["fleet_id"], running, float(rollout["watch_from"])) if running else []
        shadow = aggregate_shadow(bodies, rollout["model_sha256"])
        active = aggregate(bodies)
        elapsed = now >= float(rollout["watch_from"]) + float(rollout["window_s"])
        decision = judge_shadow(shadow, active, t, window_elapsed=elapsed)
        metrics = {**shadow.metrics(), **_active_metrics(active)}
        if decision.verdict == "rollback":
            await d.rollback(rollout, decision, now, extra=metrics)
        elif decision.verdict == "promote":
            await self._pass(rollout, devices, decision, now, metrics)
        else:
            await d.record(rollout, decision, now, len(devices), extra=metrics)

    async def _pass(
        self, rollout: dict[str, Any], devices: list[dict[str, Any]], decision: Decision, now: float, metrics: Any
    ) -> None:
        d = self.d
        sender = d.sender
        assert sender is not None
        rid, stages, stage = rollout["id"], rollout["stages"], rollout["stage"]
        running = [row for row in devices if row["cmd_id"] is not None and row["rollback_cmd_id"] is None]
        if running:
            targets = [(row["device_id"], None) for row in running]
            commands = await sender.build_many(rollout["fleet_id"], "shadow_stop", targets, rollout_id=rid)
            await send_commands(d.store, sender, rid, running, commands, "rollback_cmd_id")
        evaluation = d.evaluation(decision, now, metrics)
        if stage + 1 < len(stages):
            log.info("rollout %s %s: next stage %d%%", rid, decision.reason, stages[stage + 1])
            values: dict[str, Any] = {
                "stage": stage + 1,
                "phase": "deploying",
                "stage_started_at": now,
                "watch_from": None,
            }
        else:
            log.info("rollout %s done after its shadow stage: %s", rid, decision.reason)
            values = {"state": "done", "phase": "finished", "finished_at": now}
        if await d.store.end_shadow(
            rid, d.owner, stage, last_eval=evaluation, updated_at=now, reason=decision.reason, **values
        ):
            d.emit({**rollout, **values}, len(devices), None, None, now, extra=metrics)


def _active_metrics(active: GroupStats) -> dict[str, float]:
    return {"active_" + k: v for k, v in active.metrics().items()}
