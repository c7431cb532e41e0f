"""[mqtt] and [fleet]: the bridge's broker connection and which devices' topics it serves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from schemas.errors import TopicError
from schemas.topics import Topics, validate_id


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "cloud-bridge"
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    keepalive: int = 30
    protocol: Literal["mqtt5", "mqtt311"] = "mqtt5"
    # Messages the broker may send before we ack (MQTT 5 Receive Maximum): bounds memory and the
    # redelivery after a crash.
    receive_maximum: int = 2000
    session_expiry_s: int = 3600
    publish_window: int = 256

    def validate(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port = {self.port} must be between 1 and 65535")
        if not self.client_id:
            raise ValueError("client_id must not be empty: give each bridge instance its own id")
        if self.tls_ca is not None and not self.tls_ca.is_file():
            raise ValueError(f"tls_ca = '{self.tls_ca}' is not a readable file: point it at the CA bundle")
        for name in ("keepalive", "receive_maximum", "publish_window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be greater than 0")
        if self.receive_maximum > 65535:
            raise ValueError(f"receive_maximum = {self.receive_maximum} must be at most 65535 (MQTT 5 limit)")


@dataclass(frozen=True)
class FleetConfig:
    prefix: str = "fleet"
    share_group: str = "bridges"
    shared: bool = True
    # When the broker does not deliver shared subscriptions (checked at every connect): subscribe
    # without $share (true) or refuse to run (false).
    shared_fallback: bool = True

    def validate(self) -> None:
        try:
            Topics(self.prefix)
            validate_id("share_group", self.share_group)
        except TopicError as exc:
            raise ValueError(str(exc)) from None
