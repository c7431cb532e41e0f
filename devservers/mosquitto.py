"""A real mosquitto broker for tests, bench/ scripts and `make demo`, with a config this project controls.

Each `Mosquitto` owns a work dir holding its generated config, its log and its persistence file, and
listens on 127.0.0.1 on a free port that it keeps across restarts, so clients can reconnect to the same
address after `stop()`/`start()` or `kill()`/`start()`.

The generated config deals with the two traps of docs/traps.md that lose messages silently:
- trap 1: `max_queued_messages` / `max_queued_bytes` are set deliberately (stock mosquitto drops QoS 1
  messages past 1000 queued per client and only logs it); `dropped_messages_logged()` finds that line.
- trap 7: started as root, mosquitto switches to user `mosquitto` and then cannot write the work dir, so
  the config says `user root` when running as root, and `start()` refuses a broker whose log shows
  `Permission denied`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devservers._process import ManagedProcess
from devservers._server import LocalServer
from devservers.ports import PortWaitError, free_port, tail, wait_for_port

log = logging.getLogger(__name__)

DROPPED_LINE = "Outgoing messages are being dropped"
_FALLBACK_BINARY = Path("/usr/sbin/mosquitto")
_INSTALL_HINT = "install it with `apt-get install -y mosquitto` (or run `make test`, which installs it)"
_POLL_INTERVAL_S = 0.02


class MosquittoError(RuntimeError):
    """The broker could not be found, started, or reported a fatal problem."""


@dataclass(frozen=True)
class Listener:
    """An additional listener: `lines` follow its `listener` line (TLS files, protocol, per-listener auth)."""

    port: int
    host: str = "127.0.0.1"
    lines: tuple[str, ...] = ()

    def render(self) -> str:
        return "\n".join([f"listener {self.port} {self.host}", *self.lines])


def find_mosquitto() -> Path:
    """Path of the mosquitto binary (it lives in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("mosquitto")
    if found is not None:
        return Path(found)
    if _FALLBACK_BINARY.exists():
        return _FALLBACK_BINARY
    raise MosquittoError(f"mosquitto binary not found on PATH nor at {_FALLBACK_BINARY}: {_INSTALL_HINT}")


class Mosquitto(LocalServer):
    """A mosquitto process with its own config, log and persistence in `work_dir`.

    Not thread-safe: one owner starts and stops it. Use as a context manager (or call `stop()`) so the
    process is not left behind.

    The config is rewritten on every `start()`, so options changed in between apply on restart.
    - `max_queued_messages` / `max_queued_bytes`: per-client queue past the in-flight window (0 bytes =
      unlimited); the defaults keep a lagging subscriber's backlog instead of dropping it.
    - `extra_conf`: global lines (bridges, `acl_file`, `password_file`...), placed before the listeners.
    - `listeners` / `add_listener()`: more listeners, each followed by its own lines (TLS files,
      `protocol websockets`, per-listener auth when `per_listener_settings` is true). The main listener
      on `host:port` gets `allow_anonymous` right after its `listener` line.
    - `config_renderer`: instead of the generated config, write what it returns for this broker (e.g. a
      shipped config file with test paths and ports, see devservers/mosquitto_conf.py). It must keep
      a listener on `host:port` and log to `log_path`, which `start()` waits on.
    """

    start_timeout_s = 10.0
    stop_timeout_s = 10.0  # SIGTERM: mosquitto saves its persistence file on the way out

    def __init__(
        self,
        work_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_queued_messages: int = 1_000_000,
        max_queued_bytes: int = 0,
        max_inflight_messages: int = 100,
        allow_anonymous: bool = True,
        persistence: bool = True,
        autosave_interval_s: int = 1,
        per_listener_settings: bool = False,
        extra_conf: str = "",
        listeners: tuple[Listener, ...] = (),
        binary: Path | None = None,
        name: str = "mosquitto",
        config_renderer: Callable[[Mosquitto], str] | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.config_renderer = config_renderer
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.max_queued_messages = max_queued_messages
        self.max_queued_bytes = max_queued_bytes
        self.max_inflight_messages = max_inflight_messages
        self.allow_anonymous = allow_anonymous
        self.persistence = persistence
        self.autosave_interval_s = autosave_interval_s
        self.per_listener_settings = per_listener_settings
        self.extra_conf = extra_conf
        self.listeners: list[Listener] = list(listeners)
        self.name = name
        self._binary = binary
        self._process = ManagedProcess(name, self.work_dir / f"{name}.console.log")

    # -- paths -------------------------------------------------------------------------------------

    @property
    def conf_path(self) -> Path:
        return self.work_dir / f"{self.name}.conf"

    @property
    def log_path(self) -> Path:
        return self.work_dir / f"{self.name}.log"

    @property
    def console_log_path(self) -> Path:
        """stdout/stderr of the process: config errors are printed there before the log file opens."""
        return self._process.console_log

    @property
    def persistence_dir(self) -> Path:
        return self.work_dir / "persistence"

    @property
    def persistence_file(self) -> Path:
        return self.persistence_dir / "mosquitto.db"

    # -- config ------------------------------------------------------------------------------------

    def add_listener(self, port: int | None = None, lines: tuple[str, ...] = (), host: str = "127.0.0.1") -> int:
        """Add a listener (TLS, websockets, bridge endpoint...); applies from the next `start()`."""
        taken = {self.port, *(listener.port for listener in self.listeners)}
        chosen = port if port is not None else free_port(host, avoid=taken)
        self.listeners.append(Listener(port=chosen, host=host, lines=lines))
        return chosen

    def render_config(self) -> str:
        if self.config_renderer is not None:
            return self.config_renderer(self)
        lines = [
            f"per_listener_settings {_bool(self.per_listener_settings)}",
            # Started as root, mosquitto switches to user `mosquitto`, which cannot write our work dir
            # (docs/traps.md #7): the log and the persistence file would silently fail.
            *(["user root"] if os.geteuid() == 0 else []),
            f"persistence {_bool(self.persistence)}",
            f"persistence_location {self.persistence_dir}/",
            "persistence_file mosquitto.db",
            f"autosave_interval {self.autosave_interval_s}",
            "#persistent_client_expiration is left unset on purpose (sessions never expire)",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            # Stock limits drop QoS 1 messages for a lagging subscriber (docs/traps.md #1).
            f"max_queued_messages {self.max_queued_messages}",
            f"max_queued_bytes {self.max_queued_bytes}",
            f"max_inflight_messages {self.max_inflight_messages}",
            "set_tcp_nodelay true",
            self.extra_conf,
            f"listener {self.port} {self.host}",
            f"allow_anonymous {_bool(self.allow_anonymous)}",
            *(listener.render() for listener in self.listeners),
        ]
        return "\n".join(lines) + "\n"

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Start the broker and return once it accepts connections and reports it is running."""
        timeout = self.start_timeout_s if timeout is None else timeout
        binary = self._binary if self._binary is not None else find_mosquitto()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.persistence_dir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.render_config(), encoding="utf-8")
        offsets = (_size(self.log_path), _size(self.console_log_path))
        proc = self._process.launch([str(binary), "-c", str(self.conf_path)])
        deadline = time.monotonic() + timeout
        try:
            wait_for_port(self.host, self.port, timeout, name=self.name, process=proc, log_path=self.log_path)
            self._wait_running(offsets, deadline)
        except (PortWaitError, MosquittoError) as exc:
            self._process.kill()
            raise MosquittoError(f"{exc}\n{self._failure_context()}") from exc
        log.info("mosquitto ready name=%s host=%s port=%d pid=%s", self.name, self.host, self.port, self.pid)

    def _wait_running(self, offsets: tuple[int, int], deadline: float) -> None:
        """Wait for the "running" log line: the port alone could belong to another process."""
        while True:
            new_log = _read_from(self.log_path, offsets[0])
            new_console = _read_from(self.console_log_path, offsets[1])
            new_text = new_log + new_console
            if "Permission denied" in new_text or "Unable to open" in new_text:
                # The broker keeps running without its log or persistence: refuse it (docs/traps.md #7).
                raise MosquittoError(f"{self.name} cannot write its files:\n{new_console}{new_log}")
            if " running" in new_log:
                return
            if not self.alive:
                raise MosquittoError(f"{self.name} exited during startup")
            if time.monotonic() >= deadline:
                raise MosquittoError(f"{self.name} never logged that it is running")
            # The log file is the only signal mosquitto gives; poll it with a bounded deadline.
            time.sleep(_POLL_INTERVAL_S)

    def _failure_context(self) -> str:
        return (
            f"config {self.conf_path}\n--- log tail ({self.log_path}) ---\n{tail(self.log_path)}\n"
            f"--- console ({self.console_log_path}) ---\n{tail(self.console_log_path)}"
        )

    # -- inspection --------------------------------------------------------------------------------

    def log_text(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def dropped_messages_logged(self) -> bool:
        """Whether the broker discarded queued messages for some client (docs/traps.md #1)."""
        return DROPPED_LINE in self.log_text()

    def __repr__(self) -> str:
        return f"Mosquitto(name={self.name!r}, host={self.host!r}, port={self.port}, alive={self.alive})"


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _read_from(path: Path, offset: int) -> str:
    if not path.exists():
        return ""
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read().decode("utf-8", errors="replace")


def _bool(value: bool) -> str:
    return "true" if value else "false"
