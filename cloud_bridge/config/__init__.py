"""The bridge's configuration: a TOML file (examples/cloud.toml lists every key with its default),
overridden by `CLOUD_BRIDGE__SECTION__KEY` variables, validated section by section (common/config.py).

One module per group of sections, each section validated next to its fields: broker ([mqtt],
[fleet]), storage ([registry], [influx], [samples]), processing ([ingest], [escalation], [drift]),
ota ([ota], [rollout]), improve ([improve]). The older variable form `CLOUD_BRIDGE_SECTION__KEY` still works, with a
deprecation warning.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cloud_bridge.config.broker import FleetConfig, MqttConfig
from cloud_bridge.config.improve import ImproveConfig
from cloud_bridge.config.ota import OtaConfig, RolloutConfig
from cloud_bridge.config.processing import DriftConfig, EscalationConfig, IngestConfig
from cloud_bridge.config.storage import InfluxConfig, RegistryConfig, SamplesConfig
from cloud_bridge.errors import ConfigError
from common.config import EnvForm, check, load
from schemas.topics import Topics

ENV = EnvForm("CLOUD_BRIDGE", legacy="CLOUD_BRIDGE_")


@dataclass(frozen=True)
class BridgeConfig:
    state_dir: Path = Path("bridge-state")  # spill file, model store, the SQLite registry by default
    status_interval_s: float = 10.0
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    influx: InfluxConfig = field(default_factory=InfluxConfig)
    escalation: EscalationConfig = field(default_factory=EscalationConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    improve: ImproveConfig = field(default_factory=ImproveConfig)

    @property
    def model_store_dir(self) -> Path:
        return self.ota.model_store or Path(self.state_dir) / "models"

    @property
    def registry_url(self) -> str:
        return self.registry.url or f"sqlite+aiosqlite:///{Path(self.state_dir).resolve() / 'registry.db'}"

    @property
    def topics(self) -> Topics:
        return Topics(self.fleet.prefix)

    def validate(self) -> None:
        if self.status_interval_s <= 0:
            raise ValueError(f"status_interval_s = {self.status_interval_s} must be greater than 0")


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> BridgeConfig:
    """Read `path` (optional), apply `CLOUD_BRIDGE__*` overrides from `env` (default os.environ), validate.
    Relative paths are relative to the file."""
    return load(BridgeConfig, path, os.environ if env is None else env, ENV, ConfigError)


def validate(config: BridgeConfig) -> None:
    """The checks `load_config` runs, for a configuration built in code (raises ConfigError)."""
    check(config, ConfigError)


__all__ = [
    "ENV",
    "BridgeConfig",
    "DriftConfig",
    "EscalationConfig",
    "FleetConfig",
    "ImproveConfig",
    "InfluxConfig",
    "IngestConfig",
    "MqttConfig",
    "OtaConfig",
    "RegistryConfig",
    "RolloutConfig",
    "SamplesConfig",
    "load_config",
    "validate",
]
