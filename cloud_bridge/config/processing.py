"""[ingest], [escalation] and [drift]: how device messages are taken in, answered and watched."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cloud_bridge.drift.scoring import DriftSettings


@dataclass(frozen=True)
class IngestConfig:
    dead_letter_max_bytes: int = 4096
    batch_max: int = 1000
    dedup_cache: int = 100_000
    # How long a msg_id stays in the registry for dedup: must exceed how long a message can be
    # redelivered (the bridge's session expiry plus device outbox retries).
    seen_retention_s: float = 7 * 86400
    # How often each device is told what was stored (confirm/1): shorter frees device outboxes
    # sooner, longer sends fewer downlink messages (one per device per interval with traffic, about
    # 150 B each compact, 250 B JSON, with MQTT's framing: 27-45 kB per device-hour at 20 s, twice
    # that at 10 s, billed on a metered link) and costs the bridge less (at 10 s and 10,000 devices
    # the confirmations were 1,000 publishes a second, a sixth of its event loop). Keep it well
    # under the devices' [outbox] confirm_timeout_s (60 s), or they resend before they hear: the
    # margin is how far a bridge may lag behind before devices send again.
    confirm_interval_s: float = 20.0
    # A device clock that runs ahead would date windows in the future (a day ahead once switched
    # drift scoring off for that device for a day): a message whose ts is more than max_future_s
    # ahead of the bridge's clock is clamped to the time it arrived (its window keeps its length),
    # or dead-lettered; either way counted, with the reason logged.
    max_future_s: float = 60.0
    future_ts: Literal["clamp", "dead_letter"] = "clamp"

    def validate(self) -> None:
        for name in ("dead_letter_max_bytes", "batch_max", "seen_retention_s", "confirm_interval_s", "max_future_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be greater than 0")


@dataclass(frozen=True)
class EscalationConfig:
    # Also spelled `model_path`.
    model: Path | None = field(default=None, metadata={"aliases": ("model_path",)})
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    max_concurrency: int = 2
    max_batch: int = 64
    # Escalation requests and replies on an MQTT session of their own ("own"), so that answers are
    # not late while ingestion holds the main session's in-flight window (a commit, a backlog) or
    # its event-loop turn; "shared": on the [mqtt] session, as before. The own session connects with
    # `client_id` (default: [mqtt] client_id + "-escalation") and `username`/`password` (default:
    # [mqtt]'s). A broker that makes the username the client id (Mosquitto's
    # use_username_as_clientid, as mosquitto/cloud.conf does) needs an account of its own for it:
    # without one the two sessions keep taking each other over, and the bridge, seeing that, moves
    # escalations to the [mqtt] session and logs the fix (cloud_bridge/escalation/session.py).
    session: Literal["own", "shared"] = "own"
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    replies_in_flight: int = 256  # replies awaiting their PUBACKs on the own session at once

    def validate(self) -> None:
        if self.client_id == "":
            raise ValueError("client_id must not be empty: leave it out for [mqtt] client_id + '-escalation'")
        for name in ("max_concurrency", "max_batch", "replies_in_flight"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be greater than 0")
        if self.model is not None and not self.model.is_file():
            raise ValueError(
                f"model = '{self.model}' does not exist: point it at the cloud .onnx file "
                "or remove the key to run without escalation answers"
            )


@dataclass(frozen=True)
class DriftConfig(DriftSettings):
    """Drift detection (cloud_bridge/drift/scoring.py; thresholds documented there). The baseline class
    mix is the model's reference mix when the bridge knows the model (the files in `reference_models`,
    or the registry's model store by sha256), else that of the first `baseline_windows` windows."""

    enabled: bool = True
    reference_models: tuple[Path, ...] = ()  # .onnx files or directories of them

    def validate(self) -> None:
        for name in ("baseline_windows", "recent_windows", "min_samples", "fire_after", "resolve_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be at least 1")
        for name in ("psi_pseudocount", "latency_budget_ms", "feature_z"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be greater than 0")
        if self.cooldown_s < 0 or self.latency_floor_ms < 0:
            raise ValueError("cooldown_s and latency_floor_ms must be >= 0")
        for low, high in (
            ("psi_low", "psi_high"),
            ("confidence_drop_low", "confidence_drop_high"),
            ("feature_fraction_low", "feature_fraction_high"),
            ("latency_ratio_low", "latency_ratio_high"),
        ):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(
                    f"{low} = {getattr(self, low)} must not exceed {high} = {getattr(self, high)}: "
                    "an alert resolves below the low threshold and fires above the high one"
                )
        for path in self.reference_models:
            if not path.exists():
                raise ValueError(f"reference_models: '{path}' does not exist; list .onnx files or directories")
