"""Bridge configuration: a TOML file, then environment overrides, validated into frozen dataclasses.

Every key can be overridden with `CLOUD_BRIDGE_<SECTION>__<KEY>` (e.g. `CLOUD_BRIDGE_MQTT__HOST=broker`),
so a container can change one value without templating the file. Errors name the key and say how to fix it.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from cloud_bridge.drift.scoring import DriftSettings
from cloud_bridge.errors import ConfigError
from schemas.errors import TopicError
from schemas.topics import Topics, validate_id

ENV_PREFIX = "CLOUD_BRIDGE_"


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "cloud-bridge"
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    keepalive: int = 30
    protocol: Literal["mqtt5", "mqtt311"] = "mqtt5"
    # Messages the broker may send before we ack (MQTT 5 Receive Maximum): bounds memory and the
    # redelivery after a crash.
    receive_maximum: int = 2000
    session_expiry_s: int = 3600
    publish_window: int = 256


@dataclass(frozen=True)
class FleetConfig:
    prefix: str = "fleet"
    share_group: str = "bridges"
    shared: bool = True


@dataclass(frozen=True)
class RegistryConfig:
    url: str = ""


@dataclass(frozen=True)
class InfluxConfig:
    url: str | None = None
    # "v2": /api/v2/write with org, bucket, token (InfluxDB 2.x, 3.x, 1.8+); "v1": /write with database,
    # retention_policy, username/password or token (InfluxDB 1.x; 2.x through a DBRP mapping; 3.x).
    api: str = "v2"
    org: str = "edgefleet"
    bucket: str = "edgefleet"
    token: str = ""
    database: str = "edgefleet"
    retention_policy: str = ""  # "": the database's default
    username: str | None = None
    password: str | None = None
    batch_lines: int = 5000
    flush_interval_s: float = 0.5
    buffer_max_lines: int = 100_000
    retry_max_s: float = 10.0
    spill_max_bytes: int = 256 * 1024 * 1024  # state_dir/tsdb-spill; past it the oldest lines are dropped

    def __post_init__(self) -> None:
        if self.api not in ("v1", "v2"):
            raise ConfigError(f'[influx] api = {self.api!r} must be "v1" (InfluxDB 1.x /write) or "v2" (/api/v2/write)')
        if self.spill_max_bytes <= 0:
            raise ConfigError(f"[influx] spill_max_bytes = {self.spill_max_bytes} must be greater than 0")


@dataclass(frozen=True)
class EscalationConfig:
    model: str | None = None
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    max_concurrency: int = 2
    max_batch: int = 64


@dataclass(frozen=True)
class IngestConfig:
    dead_letter_max_bytes: int = 4096
    batch_max: int = 1000
    dedup_cache: int = 100_000
    # How long a msg_id stays in the registry for dedup: must exceed how long a message can be
    # redelivered (the bridge's session expiry plus device outbox retries).
    seen_retention_s: float = 7 * 86400


@dataclass(frozen=True)
class OtaConfig:
    """Model OTA (cloud_bridge/models/store.py, commands.py, delivery.py). Without `signing_key` the bridge
    still serves chunks but sends no commands (logged once at start)."""

    model_store: str | None = None  # default: {state_dir}/models
    signing_key: str | None = None  # Ed25519 PKCS#8 PEM from `cloud-bridge keys generate`
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


@dataclass(frozen=True)
class SamplesConfig:
    """The archive of uncertain samples for labelers (cloud_bridge/samples/cli.py), pruned hourly."""

    max_rows: int = 1_000_000  # oldest-archived rows beyond this are deleted; 0 = no row bound
    max_age_days: float = 90.0  # rows archived longer ago are deleted; 0 = no age bound


@dataclass(frozen=True)
class RolloutConfig:
    """Canary rollouts (cloud_bridge/rollout/driver.py). The thresholds are the defaults of every stage;
    `cloud-bridge rollout start --thresholds` overrides them per rollout or per stage."""

    enabled: bool = True
    tick_s: float = 5.0
    # A bridge that stops renewing its lease for this long hands its rollouts to another bridge.
    lease_s: float = 60.0
    window_s: float = 600.0
    install_timeout_s: float = 1800.0
    min_inferences: int = 200
    min_answered: int = 20
    max_escalation_rate_increase: float = 0.10
    max_agreement_drop: float = 0.10
    max_confidence_drop: float = 0.05
    max_rejection_rate_increase: float = 0.02
    max_latency_p95_ratio: float = 2.0
    latency_p95_slack_ms: float = 5.0
    max_install_failure_rate: float = 0.0


@dataclass(frozen=True)
class DriftConfig(DriftSettings):
    """Drift detection (cloud_bridge/drift/scoring.py; thresholds documented there). The baseline class mix is
    the model's reference mix when the bridge knows the model (the files in `reference_models`, or the
    registry's model store by sha256), else that of the first `baseline_windows` windows."""

    enabled: bool = True
    reference_models: tuple[str, ...] = ()  # .onnx files or directories of them


@dataclass(frozen=True)
class BridgeConfig:
    state_dir: str = "./bridge-state"
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

    @property
    def model_store_dir(self) -> Path:
        return Path(self.ota.model_store) if self.ota.model_store else Path(self.state_dir) / "models"

    @property
    def registry_url(self) -> str:
        return self.registry.url or f"sqlite+aiosqlite:///{Path(self.state_dir).resolve() / 'registry.db'}"

    @property
    def topics(self) -> Topics:
        return Topics(self.fleet.prefix)


_SECTIONS: dict[str, type[Any]] = {
    "mqtt": MqttConfig,
    "fleet": FleetConfig,
    "registry": RegistryConfig,
    "influx": InfluxConfig,
    "escalation": EscalationConfig,
    "ingest": IngestConfig,
    "drift": DriftConfig,
    "samples": SamplesConfig,
    "ota": OtaConfig,
    "rollout": RolloutConfig,
}


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> BridgeConfig:
    """Read `path` (optional), apply `CLOUD_BRIDGE_*` overrides from `env` (default os.environ), validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist: pass an existing file to --config") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    _apply_env(raw, os.environ if env is None else env)
    config = _build(raw)
    _validate(config)
    return config


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        # CLOUD_BRIDGE__MQTT__HOST (the edge node's form, EDGE_NODE__MQTT__HOST) works as well.
        key = name[len(ENV_PREFIX) :].lower().removeprefix("_")
        if "__" in key:
            section, sub = key.split("__", 1)
            target = raw.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"environment variable {name} overrides [{section}], which is not a table")
            target[sub] = value
        else:
            raw[key] = value


def _build(raw: dict[str, Any]) -> BridgeConfig:
    top_hints = get_type_hints(BridgeConfig)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table, got {type(value).__name__}")
            kwargs[key] = _build_section(key, _SECTIONS[key], value)
        elif key in top_hints and key not in _SECTIONS:
            kwargs[key] = _coerce(key, top_hints[key], value)
        else:
            known = ", ".join(sorted([*_SECTIONS, "state_dir", "status_interval_s"]))
            raise ConfigError(f"unknown key {key!r}: known top-level keys and sections are {known}")
    return BridgeConfig(**kwargs)


def _build_section(section: str, cls: type[Any], values: dict[str, Any]) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        # `[escalation] model path` is spelled `model` or `model_path`.
        name = "model" if (section, key) == ("escalation", "model_path") else key
        if name not in names:
            raise ConfigError(f"unknown key [{section}] {key!r}: known keys are {', '.join(sorted(names))}")
        kwargs[name] = _coerce(f"[{section}] {key}", hints[name], value)
    return cls(**kwargs)


def _coerce(where: str, hint: Any, value: Any) -> Any:
    """Convert TOML or environment-string values to the declared type, or raise naming the key."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value == "" and type(None) in get_args(hint)):
            return None
        return _coerce(where, args[0], value)
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where} = {value!r} is not allowed: use one of {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{where} must be a list of strings (or a comma-separated string), got {value!r}")
        return tuple(items)
    return _coerce_scalar(where, hint, value)


def _coerce_scalar(where: str, hint: Any, value: Any) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int or hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be {'an integer' if hint is int else 'a number'}, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint!r}")


def _positive(where: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{where} = {value} must be greater than 0")


def _validate(config: BridgeConfig) -> None:
    mqtt = config.mqtt
    if not 1 <= mqtt.port <= 65535:
        raise ConfigError(f"[mqtt] port = {mqtt.port} must be between 1 and 65535")
    if not mqtt.client_id:
        raise ConfigError("[mqtt] client_id must not be empty: give each bridge instance its own id")
    if mqtt.tls_ca is not None and not Path(mqtt.tls_ca).is_file():
        raise ConfigError(f"[mqtt] tls_ca = {mqtt.tls_ca!r} is not a readable file: point it at the CA bundle")
    for where, value in (
        ("[mqtt] keepalive", mqtt.keepalive),
        ("[mqtt] receive_maximum", mqtt.receive_maximum),
        ("[mqtt] publish_window", mqtt.publish_window),
        ("[escalation] max_concurrency", config.escalation.max_concurrency),
        ("[escalation] max_batch", config.escalation.max_batch),
        ("[ingest] dead_letter_max_bytes", config.ingest.dead_letter_max_bytes),
        ("[ingest] batch_max", config.ingest.batch_max),
        ("[ingest] seen_retention_s", config.ingest.seen_retention_s),
        ("[influx] batch_lines", config.influx.batch_lines),
        ("[influx] buffer_max_lines", config.influx.buffer_max_lines),
        ("status_interval_s", config.status_interval_s),
        ("[ota] command_ttl_s", config.ota.command_ttl_s),
        ("[ota] max_chunks_in_flight", config.ota.max_chunks_in_flight),
        ("[rollout] tick_s", config.rollout.tick_s),
        ("[rollout] window_s", config.rollout.window_s),
        ("[rollout] install_timeout_s", config.rollout.install_timeout_s),
    ):
        _positive(where, value)
    if config.samples.max_rows < 0 or config.samples.max_age_days < 0:
        raise ConfigError("[samples] max_rows and max_age_days must be >= 0 (0 turns that bound off)")
    if config.rollout.lease_s <= 2 * config.rollout.tick_s:
        raise ConfigError(
            f"[rollout] lease_s = {config.rollout.lease_s} must exceed 2 x tick_s ({config.rollout.tick_s}): "
            "a bridge renews its lease every tick"
        )
    _validate_drift(config.drift)
    if mqtt.receive_maximum > 65535:
        raise ConfigError(f"[mqtt] receive_maximum = {mqtt.receive_maximum} must be at most 65535 (MQTT 5 limit)")
    try:
        Topics(config.fleet.prefix)
        validate_id("[fleet] share_group", config.fleet.share_group)
    except TopicError as exc:
        raise ConfigError(f"[fleet]: {exc}") from None
    if config.escalation.model is not None and not Path(config.escalation.model).is_file():
        raise ConfigError(
            f"[escalation] model = {config.escalation.model!r} does not exist: point it at the cloud .onnx file "
            "or remove the key to run without escalation answers"
        )
    if not config.registry_url.split(":", 1)[0].startswith(("sqlite", "postgresql")):
        raise ConfigError(
            f"[registry] url = {config.registry.url!r}: use sqlite+aiosqlite:///PATH or postgresql+asyncpg://..."
        )
    if not 0.0 <= config.ota.delta_max_fraction <= 1.0:
        raise ConfigError(
            f"[ota] delta_max_fraction = {config.ota.delta_max_fraction} must be between 0 (no patches) and 1"
        )
    if not 1024 <= config.ota.chunk_size <= 1 << 20:
        raise ConfigError(f"[ota] chunk_size = {config.ota.chunk_size} must be between 1024 and 1048576 bytes")
    if config.ota.signing_key is not None and not Path(config.ota.signing_key).is_file():
        raise ConfigError(
            f"[ota] signing_key = {config.ota.signing_key!r} does not exist: create one with "
            "`cloud-bridge keys generate --out DIR` or remove the key to run without OTA commands"
        )
    if config.influx.url is not None and not config.influx.url.startswith(("http://", "https://")):
        raise ConfigError(f"[influx] url = {config.influx.url!r} must start with http:// or https://")


def _validate_drift(drift: DriftConfig) -> None:
    for name in ("baseline_windows", "recent_windows", "min_samples", "fire_after", "resolve_after"):
        if getattr(drift, name) < 1:
            raise ConfigError(f"[drift] {name} = {getattr(drift, name)} must be at least 1")
    for name in ("psi_pseudocount", "latency_budget_ms", "feature_z"):
        _positive(f"[drift] {name}", getattr(drift, name))
    if drift.cooldown_s < 0 or drift.latency_floor_ms < 0:
        raise ConfigError("[drift] cooldown_s and latency_floor_ms must be >= 0")
    for low, high in (
        ("psi_low", "psi_high"),
        ("confidence_drop_low", "confidence_drop_high"),
        ("feature_fraction_low", "feature_fraction_high"),
        ("latency_ratio_low", "latency_ratio_high"),
    ):
        if getattr(drift, low) > getattr(drift, high):
            raise ConfigError(
                f"[drift] {low} = {getattr(drift, low)} must not exceed {high} = {getattr(drift, high)}: "
                "an alert resolves below the low threshold and fires above the high one"
            )
    for path in drift.reference_models:
        if not Path(path).exists():
            raise ConfigError(f"[drift] reference_models: {path!r} does not exist; list .onnx files or directories")
