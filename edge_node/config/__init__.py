"""The edge node's configuration: a TOML file (examples/edge.toml lists every key), overridden by
`EDGE_NODE__SECTION__KEY` variables, validated section by section (common/config.py loads it).

One module per group of sections, each section validated next to its fields:
uplink ([mqtt], [outbox], [uplink]), inference ([model], [routing], [sampling]), source ([source], one
dataclass per kind), ota ([ota]); [device], [telemetry] and [node] are here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.config import EnvForm, check, load
from edge_node.config.inference import ModelConfig, RoutingConfig, SamplingConfig
from edge_node.config.ota import OtaConfig
from edge_node.config.source import (
    DirectorySourceConfig,
    DriftKind,
    MqttSourceConfig,
    ReplaySourceConfig,
    SourceConfig,
)
from edge_node.config.uplink import MqttConfig, OutboxConfig, UplinkConfig
from edge_node.errors import ConfigError
from schemas import TopicError, Topics, validate_id

ENV = EnvForm("EDGE_NODE")


@dataclass(frozen=True)
class DeviceConfig:
    fleet_id: str = ""
    device_id: str = ""

    def validate(self) -> None:
        try:
            validate_id("fleet_id", self.fleet_id)
            validate_id("device_id", self.device_id)
        except TopicError as exc:
            raise ValueError(str(exc)) from None


@dataclass(frozen=True)
class TelemetryConfig:
    # A window every 30 s: ~0.9 KB each in the compact encoding, ~2.5 MB a device a day (at 10 s,
    # 7.5 MB: most of what a device on a small LTE plan can spend).
    interval_s: float = 30.0
    max_features: int = 64
    # A window in which nothing happened waits until this long after the last one (0: every window
    # is sent): an idle device costs ~0.3 MB a day.
    idle_interval_s: float = 300.0

    def validate(self) -> None:
        if self.interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        if self.idle_interval_s < 0:
            raise ValueError("idle_interval_s must be >= 0 (0: every window is sent)")
        if not 1 <= self.max_features <= 256:
            raise ValueError("max_features must be 1-256")


@dataclass(frozen=True)
class NodeConfig:
    status_interval_s: float = 30.0  # the status line in the log (edge_node/status.py); 0: none

    def validate(self) -> None:
        if self.status_interval_s < 0:
            raise ValueError("status_interval_s must be >= 0 (0 turns the status line off)")


@dataclass(frozen=True)
class EdgeConfig:
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    source: SourceConfig = field(default_factory=MqttSourceConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)
    node: NodeConfig = field(default_factory=NodeConfig)

    @property
    def topics(self) -> Topics:
        return Topics(self.mqtt.topic_prefix)

    @property
    def ota_state_dir(self) -> Path:
        return self.ota.state_dir or self.outbox.path.parent / "ota"

    def validate(self) -> None:
        try:
            Topics(self.mqtt.topic_prefix)
        except TopicError as exc:
            raise ValueError(f"[mqtt] topic_prefix: {exc}") from None


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> EdgeConfig:
    """Read, merge and validate the configuration. Relative paths are relative to the file."""
    return load(EdgeConfig, path, os.environ if environ is None else environ, ENV, ConfigError)


def validate(config: EdgeConfig) -> None:
    """The checks `load_config` runs, for a configuration built in code (raises ConfigError)."""
    check(config, ConfigError)


__all__ = [
    "ENV",
    "DeviceConfig",
    "DirectorySourceConfig",
    "DriftKind",
    "EdgeConfig",
    "ModelConfig",
    "MqttConfig",
    "MqttSourceConfig",
    "NodeConfig",
    "OtaConfig",
    "OutboxConfig",
    "ReplaySourceConfig",
    "RoutingConfig",
    "SamplingConfig",
    "SourceConfig",
    "TelemetryConfig",
    "UplinkConfig",
    "load_config",
    "validate",
]
