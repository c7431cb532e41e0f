"""What a rollout records of each evaluation: the `last_eval` JSON and the `rollout` TSDB point.

Split from cloud_bridge/rollout/driver.py, which re-exports STATES, STATE_CODES and rollout_line.
"""

from __future__ import annotations

from typing import Any

from cloud_bridge.rollout.policy import Decision, GroupStats
from cloud_bridge.rollout.stages import is_shadow
from cloud_bridge.tsdb import FieldValue, line

STATES = ("running", "promoted", "done", "rolled_back", "aborted")
# Numeric codes for the TSDB `state` field (Grafana state timelines map them back to names).
STATE_CODES = {name: code for code, name in enumerate(STATES, start=1)}


def rollout_line(rollout: dict[str, Any], devices: int, metrics: dict[str, float], now: float) -> str:
    stages: list[int] = rollout["stages"]
    tags = {
        "fleet": rollout["fleet_id"],
        "rollout": rollout["id"],
        "model": rollout["model_name"],
        "version": rollout["model_version"],
        "stage": stage_tag(stages[min(rollout["stage"], len(stages) - 1)]),
    }
    fields: dict[str, FieldValue] = {"devices": devices, "state": STATE_CODES[rollout["state"]]}
    fields.update(metrics)
    return line("rollout", tags, fields, round(now * 1000))


def stage_tag(stage: int) -> str:
    return f"shadow{-stage}" if is_shadow(stage) else str(stage)


def eval_record(
    decision: Decision,
    now: float,
    canary: GroupStats | None,
    control: GroupStats | None,
    extra: dict[str, float] | None = None,
) -> dict[str, Any]:
    return {
        "at": now,
        "verdict": decision.verdict,
        "reason": decision.reason,
        "canary": canary.metrics() if canary else {},
        "control": control.metrics() if control else {},
        **({"shadow": extra} if extra else {}),
        "checks": [
            {"metric": c.metric, "canary": c.canary, "control": c.control, "limit": c.limit, "passed": c.passed}
            for c in decision.checks
        ],
    }
