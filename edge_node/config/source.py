"""[source]: where inputs come from, one kind per table (`kind` picks the dataclass and its keys)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DriftKind = Literal["none", "noise", "rotation", "class_shift"]


@dataclass(frozen=True)
class MqttSourceConfig:
    """input/1 messages on {topic_prefix}/{fleet_id}/{device_id}/input."""

    kind: Literal["mqtt"] = "mqtt"


@dataclass(frozen=True)
class DirectorySourceConfig:
    """.npy files appearing in a folder (each is read once, then moved aside)."""

    kind: Literal["directory"] = "directory"
    path: Path | None = None
    poll_s: float = 0.5

    def validate(self) -> None:
        if self.path is None:
            raise ValueError('kind = "directory" needs path = "DIR" (the folder to watch)')
        if self.poll_s <= 0:
            raise ValueError("poll_s must be > 0")


@dataclass(frozen=True)
class ReplaySourceConfig:
    """The demo digits' held-out split replayed at `rate_hz`, with optional drift (needs the demo extra)."""

    kind: Literal["replay"] = "replay"
    rate_hz: float = 50.0
    limit: int = 0
    loop: bool = True
    seed: int = 0
    drift: DriftKind = "none"
    # 0 = the kind's usual strength (demokit.drift.DEFAULT_STRENGTH: noise sigma 4, 20 degrees,
    # 30% of the class mix), so `drift = "rotation"` alone injects a drift a detector should see.
    drift_strength: float = 0.0
    drift_after: int = 0  # inputs replayed before the drift starts

    def validate(self) -> None:
        if self.rate_hz <= 0:
            raise ValueError("rate_hz must be > 0")
        if self.limit < 0:
            raise ValueError("limit must be >= 0 (0 means no limit)")
        if self.drift_strength < 0:
            raise ValueError("drift_strength must be >= 0 (0: the kind's usual strength)")
        if self.drift == "class_shift" and self.drift_strength > 1:
            raise ValueError("drift_strength of class_shift is a share of the class mix: use 0-1")
        if self.drift_after < 0:
            raise ValueError("drift_after must be >= 0")


SourceConfig = MqttSourceConfig | DirectorySourceConfig | ReplaySourceConfig
