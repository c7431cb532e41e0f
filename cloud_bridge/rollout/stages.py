"""Which devices a rollout stage takes, and which telemetry is canary and which control.

Selection is deterministic: the fleet's devices (those already on the new model before the rollout
are left out) sorted by sha256(rollout_id + device_id), and the first ceil(pct * N / 100) of them,
cumulative across stages. Offline devices (registry `devices.online`) are skipped and the next in
order is taken; a stage with fewer online devices than its share proceeds with those it has.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cloud_bridge.errors import UsageError
from cloud_bridge.rollout.policy import GroupStats, aggregate


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


def parse_stages(text: str) -> tuple[int, ...]:
    try:
        stages = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--stages {text!r} must be comma-separated percentages, e.g. 5,25,100") from None
    if not stages or any(not 1 <= s <= 100 for s in stages) or list(stages) != sorted(set(stages)):
        raise UsageError(f"--stages {text!r} must be increasing percentages between 1 and 100, e.g. 5,25,100")
    return stages


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
