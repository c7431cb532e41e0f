"""[ota] and [rollout]: signing and delivering model updates, and canary rollouts over the fleet."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cloud_bridge.rollout.policy import Thresholds


@dataclass(frozen=True)
class OtaConfig:
    """Model OTA (cloud_bridge/ota). Without `signing_key` the bridge still serves chunks but sends no
    commands (logged once at start)."""

    model_store: Path | None = None  # default: {state_dir}/models
    signing_key: Path | None = None  # Ed25519 PKCS#8 PEM from `cloud-bridge keys generate`
    key_id: str | None = None  # default: the key's fingerprint (schemas.signing.key_id_of)
    # Must equal what commands announce: a device checks every chunk's length against it.
    chunk_size: int = 65536
    command_ttl_s: float = 3600.0
    max_chunks_in_flight: int = 8
    max_chunks_per_s: float = 0.0  # 0 = no rate limit beyond the in-flight bound
    # A request for a chunk sent this recently is answered by that send (devices behind one gateway).
    coalesce_s: float = 0.5
    # Offer a binary patch from the device's current model when it is at most this fraction of the
    # new model (cloud_bridge/ota/deltas.py); 0 sends whole models only.
    delta_max_fraction: float = 0.5

    def validate(self) -> None:
        for name in ("command_ttl_s", "max_chunks_in_flight"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be greater than 0")
        if not 0.0 <= self.delta_max_fraction <= 1.0:
            raise ValueError(f"delta_max_fraction = {self.delta_max_fraction} must be between 0 (no patches) and 1")
        if not 1024 <= self.chunk_size <= 1 << 20:
            raise ValueError(f"chunk_size = {self.chunk_size} must be between 1024 and 1048576 bytes")
        if self.signing_key is not None and not self.signing_key.is_file():
            raise ValueError(
                f"signing_key = '{self.signing_key}' does not exist: create one with "
                "`cloud-bridge keys generate --out DIR` or remove the key to run without OTA commands"
            )


@dataclass(frozen=True)
class RolloutConfig(Thresholds):
    """Canary rollouts (cloud_bridge/rollout). The stage thresholds (min_inferences ...
    max_install_failure_rate) are inherited from cloud_bridge.rollout.policy.Thresholds, which defines
    their names, types and defaults once; here they are every stage's defaults, and `cloud-bridge
    rollout start --thresholds` overrides them per rollout or per stage."""

    enabled: bool = True
    tick_s: float = 5.0
    # A bridge that stops renewing its lease for this long hands its rollouts to another bridge.
    lease_s: float = 60.0
    window_s: float = 600.0
    install_timeout_s: float = 1800.0

    def validate(self) -> None:
        for name in ("tick_s", "window_s", "install_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be greater than 0")
        if self.lease_s <= 2 * self.tick_s:
            raise ValueError(
                f"lease_s = {self.lease_s} must exceed 2 x tick_s ({self.tick_s}): a bridge renews its lease every tick"
            )
