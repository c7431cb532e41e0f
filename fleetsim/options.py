"""Where the simulator connects and what one simulator process runs, as plain data (sent to worker
processes as JSON; credentials travel on the worker's stdin, never its command line)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from common.tls import client_context
from fleetsim.mqtt5 import Broker
from fleetsim.profile import Profile


class OptionsError(Exception):
    """An unusable option (the message names it and the fix)."""


@dataclass(frozen=True)
class BrokerOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca: str | None = None  # PEM CA file; None with tls: the system's CAs
    cert: str | None = None
    key: str | None = None
    insecure: bool = False  # do not check the broker's host name against its certificate
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 60

    def resolve(self) -> Broker:
        """The connection settings, the TLS files read (a bad file is an `OptionsError`)."""
        tls = None
        if self.tls or self.ca or self.cert:
            tls = client_context(
                self.ca, self.cert, self.key, error=OptionsError, check_hostname=not self.insecure, section="fleetsim"
            )
        return Broker(self.host, self.port, tls, self.username, self.password, self.keepalive_s)


@dataclass(frozen=True)
class Spec:
    """What one simulator process runs."""

    broker: BrokerOptions
    profile: Profile
    devices: int
    first: int = 0
    prefix: str = "fleet"
    fleet: str = "sim"
    device_format: str = "sim-{:06d}"
    connections: int = 4  # per process
    seed: int = 0
    track_confirms: bool = True
    client_prefix: str = "fleetsim"
    report_s: float = 5.0
    drain_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        data: dict[str, Any] = json.loads(text)
        data["broker"] = BrokerOptions(**data["broker"])
        data["profile"] = Profile(**data["profile"])
        return cls(**data)

    def part(self, index: int, parts: int) -> Spec:
        """The `index`-th of `parts` processes sharing these devices (and the connections)."""
        first = index * self.devices // parts
        count = (index + 1) * self.devices // parts - first
        return dataclasses.replace(
            self,
            devices=count,
            first=self.first + first,
            seed=self.seed * 1000 + index,
        )
