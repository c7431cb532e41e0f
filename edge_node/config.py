"""Edge node configuration: a TOML file, overridden by environment variables.

Every key can be overridden as EDGE_NODE__SECTION__KEY, e.g. `EDGE_NODE__MQTT__HOST=gw.local`
or `EDGE_NODE__ROUTING__CONFIDENCE_THRESHOLD=0.9` (values are parsed as TOML scalars, so
lists work too: `EDGE_NODE__MODEL__PROVIDERS='["CPUExecutionProvider"]'`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge_node.errors import ConfigError
from schemas import TopicError, Topics, validate_id
from schemas.signing import SignatureError, parse_public_key

ENV_PREFIX = "EDGE_NODE__"


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive: int = 30
    protocol: Literal["auto", "mqtt5", "mqtt311"] = "auto"
    session_expiry_s: int = 7 * 24 * 3600
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    inflight_window: int = 64
    topic_prefix: str = "fleet"


@dataclass(frozen=True)
class DeviceConfig:
    fleet_id: str = ""
    device_id: str = ""


@dataclass(frozen=True)
class ModelConfig:
    path: Path = Path("model.onnx")
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 1
    max_batch: int = 256


@dataclass(frozen=True)
class RoutingConfig:
    confidence_threshold: float = 0.8
    escalation_timeout_s: float = 2.0
    max_outstanding: int = 64
    escalate: bool = True
    publish_results: bool = True


@dataclass(frozen=True)
class SamplingConfig:
    entropy_threshold: float = 1.0
    margin_threshold: float = 0.2
    max_per_minute: int = 60
    top_k: int = 3


@dataclass(frozen=True)
class TelemetryConfig:
    interval_s: float = 10.0
    max_features: int = 64


@dataclass(frozen=True)
class OutboxConfig:
    path: Path = Path("state/outbox.sqlite")
    max_bytes: int = 64 * 1024 * 1024
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"


@dataclass(frozen=True)
class SourceConfig:
    kind: Literal["mqtt", "directory", "replay"] = "mqtt"
    # directory
    path: Path | None = None
    poll_s: float = 0.5
    # replay
    rate_hz: float = 50.0
    limit: int = 0
    loop: bool = True
    seed: int = 0
    drift: Literal["none", "noise", "rotation", "class_shift"] = "none"
    # 0 = the kind's usual strength (demokit.drift.DEFAULT_STRENGTH: noise sigma 4, 20 degrees,
    # 30% of the class mix), so `drift = "rotation"` alone injects a drift a detector should see.
    drift_strength: float = 0.0
    drift_after: int = 0  # inputs replayed before the drift starts


@dataclass(frozen=True)
class OtaConfig:
    """Model OTA: which keys may sign commands, where downloads and the replay record live."""

    state_dir: Path | None = None  # default: an "ota" dir next to the outbox file
    # key id -> base64 Ed25519 public key; env: EDGE_NODE__OTA__TRUSTED_KEYS="id=b64,id2=b64"
    trusted_keys: dict[str, str] = field(default_factory=dict)
    chunk_timeout_s: float = 10.0  # no new chunk for this long: ask again for the missing ones
    chunk_timeout_max_s: float = 120.0  # the backoff of those re-requests stops growing here
    max_clock_skew_s: float = 300.0  # tolerance on a command's issued_at / expires_at
    # A command issued this much earlier than the newest accepted one is refused as a replay.
    replay_window_s: float = 7 * 24 * 3600.0
    # Install (edge_node/ota/slots.py). After a switch the new model is on probation this long: an
    # exception in its run, a higher error/rejection rate or a lower mean confidence than the old
    # model's (beyond the allowances below) switches back. Rates are compared only past
    # probation_min_inferences inputs.
    health_probation_s: float = 60.0
    probation_min_inferences: int = 50
    probation_max_confidence_drop: float = 0.10
    probation_max_error_rate_increase: float = 0.05
    # This many starts while a new model is still on probation (it keeps crashing the node) and
    # the node starts on the previous slot instead.
    crash_loop_limit: int = 3
    health_latency_runs: int = 50  # batch-1 runs timed by the health check for the p95
    health_max_latency_budget_ms: float = 0.0  # > 0: caps the command's latency_budget_ms


@dataclass(frozen=True)
class EdgeConfig:
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)

    @property
    def topics(self) -> Topics:
        return Topics(self.mqtt.topic_prefix)

    @property
    def ota_state_dir(self) -> Path:
        return self.ota.state_dir or self.outbox.path.parent / "ota"


def _coerce(key: str, value: Any, hint: Any, base: Path) -> Any:
    """Convert a TOML value to the dataclass field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        return None if value is None else _coerce(key, value, inner[0], base)
    if isinstance(value, _EnvValue):
        value = value.typed(key, hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} = {value!r} is not allowed: use one of {', '.join(map(repr, args))}")
        return value
    if origin is dict:
        return _coerce_str_map(key, value)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f'{key} must be a list of strings, e.g. ["CPUExecutionProvider"]')
        return tuple(value)
    if hint is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(f"{key} must be a path string, got {value!r}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")  # a bug in this module, not in the file


def _coerce_str_map(key: str, value: Any) -> dict[str, str]:
    """A TOML table of strings, or "k=v,k2=v2" from the environment (a value may contain '=')."""
    if isinstance(value, str):
        pairs = [item.strip().partition("=") for item in value.split(",") if item.strip()]
        if any(not k.strip() or not sep for k, sep, _ in pairs):
            raise ConfigError(f'{key} must be a table or "id=value,id2=value2", got {value!r}')
        return {k.strip(): v.strip() for k, _, v in pairs}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f'{key} must be a table of strings, e.g. {key.split()[-1]} = {{"id" = "base64"}}')
    return {str(k): v for k, v in value.items()}


def _build(cls: type[Any], section: str, values: Mapping[str, Any], base: Path) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'[{section}] {k}' for k in unknown)}: "
            f"known keys are {', '.join(sorted(known))}"
        )
    kwargs = {k: _coerce(f"[{section}] {k}", v, hints[k], base) for k, v in values.items()}
    return cls(**kwargs)


_ENV_FORM = f"use {ENV_PREFIX}SECTION__KEY, e.g. {ENV_PREFIX}MQTT__HOST"


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """`EDGE_NODE__SECTION__KEY=value` as {section: {key: _EnvValue}}: typed later, by the field it sets."""
    out: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            if name.startswith(ENV_PREFIX[:-1]):  # EDGE_NODE_MQTT__HOST: would be ignored, silently
                raise ConfigError(f"environment variable {name}: {_ENV_FORM}")
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2:
            raise ConfigError(f"environment variable {name}: {_ENV_FORM}")
        out.setdefault(parts[0], {})[parts[1]] = _EnvValue(raw)
    return out


class _EnvValue(str):
    """A value from the environment: always text, converted to what its field needs (a password
    of digits stays a string, a port of digits becomes a number)."""

    __slots__ = ()

    def typed(self, key: str, hint: Any) -> Any:
        if hint is str or hint is Path or typing.get_origin(hint) in (Literal, dict):
            return str(self)
        if hint is tuple or typing.get_origin(hint) is tuple:
            return self._toml(key) if self.lstrip().startswith("[") else str(self)
        if hint in (int, float, bool):
            return self._toml(key)
        return str(self)

    def _toml(self, key: str) -> Any:
        try:
            return tomllib.loads(f"v = {self}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"{key} = {str(self)!r} (from the environment) is not a valid TOML value") from None


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> EdgeConfig:
    """Read, merge and validate the configuration. Relative paths are relative to the file."""
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist: pass --config with an existing TOML file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        base = path.resolve().parent
    for section, values in _env_overrides(os.environ if environ is None else environ).items():
        data.setdefault(section, {}).update(values)
    sections = {f.name: f for f in dataclasses.fields(EdgeConfig)}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(f'[{s}]' for s in unknown)}: known are {', '.join(sections)}")
    hints = typing.get_type_hints(EdgeConfig)
    built = {name: _build(hints[name], name, data.get(name, {}), base) for name in sections}
    config = EdgeConfig(**built)
    validate(config)
    return config


def validate(config: EdgeConfig) -> None:
    """Cross-field checks that name the key and how to fix it."""
    try:
        validate_id("[device] fleet_id", config.device.fleet_id)
        validate_id("[device] device_id", config.device.device_id)
        Topics(config.mqtt.topic_prefix)
    except TopicError as exc:
        raise ConfigError(str(exc)) from None
    checks: list[tuple[bool, str]] = [
        (1 <= config.mqtt.port <= 65535, "[mqtt] port must be 1-65535"),
        (config.mqtt.keepalive >= 5, "[mqtt] keepalive must be at least 5 seconds"),
        (
            0 < config.mqtt.reconnect_min_s <= config.mqtt.reconnect_max_s,
            "[mqtt] reconnect_min_s must be > 0 and <= reconnect_max_s",
        ),
        (config.mqtt.inflight_window >= 1, "[mqtt] inflight_window must be at least 1"),
        (
            config.mqtt.tls_ca is None or config.mqtt.tls_ca.exists(),
            f"[mqtt] tls_ca {config.mqtt.tls_ca} does not exist: point it at the broker's CA certificate",
        ),
        (
            (config.mqtt.tls_cert is None) == (config.mqtt.tls_key is None),
            "[mqtt] tls_cert and tls_key go together: set both or neither",
        ),
        (
            config.model.path.exists(),
            f"[model] path {config.model.path} does not exist: build the demo models with "
            "`python -m demokit.models --out build/models` or point it at your .onnx file",
        ),
        (len(config.model.providers) > 0, "[model] providers must list at least one execution provider"),
        (config.model.intra_op_threads >= 1, "[model] intra_op_threads must be at least 1"),
        (1 <= config.model.max_batch <= 4096, "[model] max_batch must be 1-4096"),
        (
            0.0 < config.routing.confidence_threshold <= 1.0,
            "[routing] confidence_threshold must be in (0, 1]",
        ),
        (config.routing.escalation_timeout_s > 0, "[routing] escalation_timeout_s must be > 0"),
        (config.routing.max_outstanding >= 1, "[routing] max_outstanding must be at least 1"),
        (config.sampling.entropy_threshold >= 0, "[sampling] entropy_threshold must be >= 0"),
        (0 <= config.sampling.margin_threshold <= 1, "[sampling] margin_threshold must be in [0, 1]"),
        (config.sampling.max_per_minute >= 0, "[sampling] max_per_minute must be >= 0 (0 disables sampling)"),
        (config.sampling.top_k >= 1, "[sampling] top_k must be at least 1"),
        (config.telemetry.interval_s > 0, "[telemetry] interval_s must be > 0"),
        (1 <= config.telemetry.max_features <= 256, "[telemetry] max_features must be 1-256"),
        (config.outbox.max_bytes >= 64 * 1024, "[outbox] max_bytes must be at least 65536"),
        (
            config.source.kind != "directory" or config.source.path is not None,
            '[source] kind = "directory" needs path = "DIR" (the folder to watch)',
        ),
        (config.source.rate_hz > 0, "[source] rate_hz must be > 0"),
        (config.source.limit >= 0, "[source] limit must be >= 0 (0 means no limit)"),
        (config.source.drift_strength >= 0, "[source] drift_strength must be >= 0 (0: the kind's usual strength)"),
        (
            config.source.drift != "class_shift" or config.source.drift_strength <= 1,
            "[source] drift_strength of class_shift is a share of the class mix: use 0-1",
        ),
        (config.source.drift_after >= 0, "[source] drift_after must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _validate_ota(config.ota)


def _validate_ota(ota: OtaConfig) -> None:
    for key_id, text in ota.trusted_keys.items():
        try:
            parse_public_key(text)
        except SignatureError as exc:
            raise ConfigError(
                f"[ota] trusted_keys {key_id!r}: {exc}; paste the base64 printed by `cloud-bridge keys generate`"
            ) from None
    for ok, message in (
        (ota.chunk_timeout_s > 0, "[ota] chunk_timeout_s must be > 0"),
        (ota.chunk_timeout_max_s >= ota.chunk_timeout_s, "[ota] chunk_timeout_max_s must be >= chunk_timeout_s"),
        (ota.max_clock_skew_s >= 0, "[ota] max_clock_skew_s must be >= 0"),
        (ota.replay_window_s > 0, "[ota] replay_window_s must be > 0"),
        (ota.health_probation_s >= 0, "[ota] health_probation_s must be >= 0"),
        (ota.probation_min_inferences >= 1, "[ota] probation_min_inferences must be at least 1"),
        (0 <= ota.probation_max_confidence_drop <= 1, "[ota] probation_max_confidence_drop must be in [0, 1]"),
        (
            0 <= ota.probation_max_error_rate_increase <= 1,
            "[ota] probation_max_error_rate_increase must be in [0, 1]",
        ),
        (ota.crash_loop_limit >= 1, "[ota] crash_loop_limit must be at least 1"),
        (ota.health_latency_runs >= 1, "[ota] health_latency_runs must be at least 1"),
        (ota.health_max_latency_budget_ms >= 0, "[ota] health_max_latency_budget_ms must be >= 0 (0: no cap)"),
    ):
        if not ok:
            raise ConfigError(message)
