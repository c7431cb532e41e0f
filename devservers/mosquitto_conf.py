"""Run the broker configs this project ships (mosquitto/*.conf) in tests, with only paths and ports changed.

The shipped files name container paths (`/mosquitto/config/acl`, `/mosquitto/certs/ca.crt`, ...) and
standard ports (8883, 1883). `ShippedConfig` rewrites exactly those: every container path to a test
path, every listener port to a free port bound on the broker's host, and bridge `address` lines to a
test address. Anything else is the shipped text, so a test exercises the file that gets deployed.

A container path left without a test path is an error that names it, so a new path in a shipped file
cannot be silently ignored by the tests.

Use it as the `config_renderer` of a `devservers.Mosquitto`:

    rendered = ShippedConfig(Path("mosquitto/cloud.conf"), files={...}, main_port=1883, ports={8883: tls_port})
    broker = Mosquitto(work_dir, config_renderer=rendered)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devservers.mosquitto import Mosquitto, MosquittoError

# The data and log locations of the eclipse-mosquitto image: they become the broker's own work dir.
DATA_DIR = "/mosquitto/data/"
LOG_FILE = "/mosquitto/log/mosquitto.log"
_CONTAINER_ROOT = "/mosquitto/"
_LISTENER_RE = re.compile(r"^listener\s+(\d+)(?:\s+(\S+))?\s*$")
_ADDRESS_RE = re.compile(r"^(address|addresses)\s+(\S+)\s*$")
_PATH_RE = re.compile(r"(?<![\w/])/mosquitto/\S*")


@dataclass(frozen=True)
class ShippedConfig:
    """A shipped mosquitto config rendered for one test broker.

    - `files`: container path -> test path (certificates, password file, ACL...).
    - `main_port`: the shipped port of the listener the broker's readiness check connects to; it
      becomes `broker.port`.
    - `ports`: other shipped listener ports -> test ports.
    - `addresses`: bridge `address` value as shipped (`host:port`) -> test `host:port`.
    """

    source: Path
    files: Mapping[str, Path] = field(default_factory=dict)
    main_port: int = 1883
    ports: Mapping[int, int] = field(default_factory=dict)
    addresses: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, broker: Mosquitto) -> str:
        try:
            text = self.source.read_text(encoding="utf-8")
        except OSError as exc:
            raise MosquittoError(f"cannot read shipped config {self.source}: {exc}") from exc
        paths = {DATA_DIR: f"{broker.persistence_dir}/", LOG_FILE: str(broker.log_path)}
        paths.update({k: str(v) for k, v in self.files.items()})
        ports = {**self.ports, self.main_port: broker.port}
        lines = [self._line(raw, n, broker.host, paths, ports) for n, raw in enumerate(text.splitlines(), 1)]
        return "\n".join(lines) + "\n"

    def _line(self, raw: str, number: int, host: str, paths: Mapping[str, str], ports: Mapping[int, int]) -> str:
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            return raw
        where = f"{self.source}:{number}"
        if stripped == "user mosquitto" and os.geteuid() == 0:
            # As root mosquitto would switch to `mosquitto`, which cannot write the test's dir (docs/traps.md #7).
            return "user root"
        listener = _LISTENER_RE.match(stripped)
        if listener is not None:
            return f"listener {_mapped_port(int(listener.group(1)), ports, where)} {host}"
        address = _ADDRESS_RE.match(stripped)
        if address is not None:
            target = self.addresses.get(address.group(2))
            if target is None:
                shipped = address.group(2)
                raise MosquittoError(f"{where}: bridge address {shipped!r} has no test address: pass addresses=")
            return f"{address.group(1)} {target}"
        return _PATH_RE.sub(lambda m: _mapped_path(m.group(0), paths, where), raw)


def _mapped_port(port: int, ports: Mapping[int, int], where: str) -> int:
    if port not in ports:
        raise MosquittoError(f"{where}: listener port {port} has no test port: pass ports={{{port}: ...}}")
    return ports[port]


def _mapped_path(path: str, paths: Mapping[str, str], where: str) -> str:
    if path in paths:
        return paths[path]
    # Directory entries end with "/" and map a whole prefix (the persistence location).
    for shipped, local in paths.items():
        if shipped.endswith("/") and path.startswith(shipped):
            return local + path[len(shipped) :]
    raise MosquittoError(f"{where}: container path {path} has no test path: pass files={{{path!r}: ...}}")
