"""A real amqtt broker: an MQTT 3.1.1 broker that ignores `$share/...` shared subscriptions.

Such a subscription silently matches nothing there (measured: a client subscribed to `$share/g/a/b`
receives nothing published to `a/b`). The tests start it to check that the bridge notices and falls
back to plain subscriptions (or refuses to run) instead of receiving nothing. amqtt comes with the
`test` extra; it listens on 127.0.0.1 only, on a free port, anonymous clients allowed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from devservers._process import ManagedProcess
from devservers._server import LocalServer
from devservers.ports import free_port, tail, wait_for_port


def find_amqtt() -> Path:
    """The `amqtt` script of this interpreter's environment."""
    path = Path(sys.executable).with_name("amqtt")
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: install the test extra (pip install -e '.[test]')")
    return path


class Amqtt(LocalServer):
    start_timeout_s = 20.0
    stop_timeout_s = 10.0  # SIGTERM: amqtt keeps nothing

    def __init__(self, work_dir: Path, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self._process = ManagedProcess("amqtt", self.work_dir / "amqtt.log")

    @property
    def conf_path(self) -> Path:
        return self.work_dir / "amqtt.yaml"

    def start(self, timeout: float | None = None) -> None:
        timeout = self.start_timeout_s if timeout is None else timeout
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(
            "listeners:\n"
            "  default:\n"
            "    type: tcp\n"
            f"    bind: {self.host}:{self.port}\n"
            "plugins:\n"
            "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        proc = self._process.launch([str(find_amqtt()), "-c", str(self.conf_path)])
        try:
            wait_for_port(self.host, self.port, timeout, name="amqtt", process=proc, log_path=self._process.console_log)
        except BaseException:
            self.stop()
            raise

    def log_text(self) -> str:
        return tail(self._process.console_log)
