"""[mqtt], [outbox] and [uplink]: how the node reaches its broker, what it keeps while it cannot,
and what it spends on the link."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""  # default: edge-<device_id>
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive: int = 60
    protocol: Literal["auto", "mqtt5", "mqtt311"] = "auto"
    session_expiry_s: int = 7 * 24 * 3600
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    inflight_window: int = 64
    topic_prefix: str = "fleet"
    topic_aliases: int = 16

    def validate(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError("port must be 1-65535")
        if self.keepalive < 5:
            raise ValueError("keepalive must be at least 5 seconds")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError("reconnect_min_s must be > 0 and <= reconnect_max_s")
        if self.inflight_window < 1:
            raise ValueError("inflight_window must be at least 1")
        if not 0 <= self.topic_aliases <= 65535:
            raise ValueError("topic_aliases must be 0-65535 (0 = none)")
        if self.tls_ca is not None and not self.tls_ca.is_file():
            raise ValueError(f"tls_ca {self.tls_ca} does not exist: point it at the broker's CA certificate")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")


@dataclass(frozen=True)
class OutboxConfig:
    path: Path = Path("state/outbox.sqlite")
    max_bytes: int = 64 * 1024 * 1024
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    # confirmed: a message the cloud stores leaves the outbox when a cloud bridge confirms it
    # (confirm/1); broker: when the broker acknowledged it (for a deployment whose cloud side
    # cannot confirm: what a broker loses after its PUBACK is then lost).
    delivery: Literal["confirmed", "broker"] = "confirmed"
    confirm_window: int = 4096  # rows sent and not yet confirmed; past it only CONTROL rows go out
    confirm_timeout_s: float = 60.0  # no confirmation for this long: send again (doubling per attempt)
    confirm_timeout_max_s: float = 3600.0

    def validate(self) -> None:
        if self.max_bytes < 64 * 1024:
            raise ValueError("max_bytes must be at least 65536")
        if self.confirm_window < 1:
            raise ValueError("confirm_window must be at least 1")
        if not 0 < self.confirm_timeout_s <= self.confirm_timeout_max_s:
            raise ValueError("confirm_timeout_s must be > 0 and <= confirm_timeout_max_s")


@dataclass(frozen=True)
class UplinkConfig:
    """What the node sends and how, for links billed per byte (bench/uplink.py measures each choice)."""

    # auto: JSON until a cloud bridge says it reads the compact encoding (msgpack, deflated against a
    # shared dictionary, schemas/compact.py), then compact; json / compact: always that one.
    encoding: Literal["auto", "json", "compact"] = "auto"
    # Answers go up as result/2 messages of up to results_max_answers, sent at the latest
    # results_max_delay_s after the first one waited (0: one message per micro-batch). 10 s: at 1 Hz
    # ten answers share a message (~60 bytes an answer instead of ~240), and a bridge receives a
    # tenth of the messages; a result reaches the cloud at most 10 s after its answer.
    results_max_answers: int = 256
    results_max_delay_s: float = 10.0
    # Bytes a day the link may cost, up and down (0: no limit); spent by priority, control >
    # telemetry > escalations > samples > results, what does not fit held back and counted.
    daily_bytes: int = 0

    def validate(self) -> None:
        if self.daily_bytes < 0:
            raise ValueError("daily_bytes must be >= 0 (0: no limit)")
        if not 1 <= self.results_max_answers <= 1024:
            raise ValueError("results_max_answers must be 1-1024")
        if not 0 <= self.results_max_delay_s <= 60:
            raise ValueError("results_max_delay_s must be 0-60")
