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


def is_shadow(stage: int) -> bool:
    """A rollout's `stages` holds percentages; a shadow stage is stored as minus its percentage."""
    return stage < 0


def stage_pct(stage: int) -> int:
    return abs(stage)


def stage_label(stage: int) -> str:
    return f"shadow {-stage}%" if stage < 0 else f"{stage}%"


def stages_text(stages: Iterable[int]) -> str:
    """A rollout's stages as `--stages` takes them: "shadow:100,25,100"."""
    return ",".join(f"shadow:{-s}" if s < 0 else str(s) for s in stages)


def threshold_key(stage: int) -> str:
    """The key of a stage's own thresholds (`--thresholds PCT:name=value` / `shadow:name=value`)."""
    return "shadow" if stage < 0 else str(stage)


def parse_stages(text: str) -> tuple[int, ...]:
    """ "5,25,100", optionally led by one shadow stage "shadow:PCT" (stored as -PCT): the candidate runs
    beside the active model on PCT % of the fleet before any device switches (cloud_bridge/rollout/shadow.py)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    shadow: tuple[int, ...] = ()
    if parts and parts[0].startswith("shadow:"):
        raw = parts.pop(0).removeprefix("shadow:")
        if not raw.isdigit() or not 1 <= int(raw) <= 100:
            raise UsageError(f"--stages {text!r}: the shadow stage must look like shadow:PCT with PCT in 1..100")
        shadow = (-int(raw),)
    if any(p.startswith("shadow") for p in parts):
        raise UsageError(f"--stages {text!r}: a shadow stage comes first, once (shadow:100,25,100)")
    try:
        stages = tuple(int(part) for part in parts)
    except ValueError:
        raise UsageError(f"--stages {text!r} must be comma-separated percentages, e.g. 5,25,100") from None
    if shadow and not stages:
        raise UsageError(
            f"--stages {text!r}: a shadow stage precedes canary stages, e.g. shadow:100,25,100 (it switches no device)"
        )
    if not stages or any(not 1 <= s <= 100 for s in stages) or list(stages) != sorted(set(stages)):
        raise UsageError(f"--stages {text!r} must be increasing percentages between 1 and 100, e.g. 5,25,100")
    return shadow + stages


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
