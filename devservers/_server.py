"""What every local dev server shares: one child process, its liveness, a hard kill, a restart on the
same port and data, and the context-manager protocol that stops it when the block ends.

Each server (mosquitto, victoria-metrics, InfluxDB 1.x, amqtt) only says how it starts (command line,
config file, readiness check) and, where its shutdown saves something, how long a graceful stop may
take. `stop()` is SIGTERM and wait, so each server saves its state on the way out (mosquitto its
persistence file, victoria-metrics its in-memory parts, influxd its shards and WAL); `kill()` is
SIGKILL, a simulated crash or power cut that saves nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

from devservers._process import ManagedProcess


class LocalServer(ABC):
    """A server process owned by one caller (not thread-safe for lifecycle calls)."""

    name: str
    _process: ManagedProcess
    # How long starting may take before it counts as failed, and a graceful stop before the kill.
    start_timeout_s: float = 20.0
    stop_timeout_s: float = 10.0

    @abstractmethod
    def start(self, timeout: float | None = None) -> None:
        """Start the process and return once it serves requests (within `timeout`, by default
        `start_timeout_s`); raise naming the log otherwise."""

    @property
    def alive(self) -> bool:
        return self._process.alive

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM and wait (SIGKILL past `timeout`): the server saves what it holds."""
        self._process.terminate(self.stop_timeout_s if timeout is None else timeout)

    def kill(self) -> None:
        """SIGKILL: nothing is saved beyond what the server had already written."""
        self._process.kill()

    def restart(self, timeout: float | None = None) -> None:
        """Stop gracefully, then start again on the same port with the same data."""
        self.stop()
        self.start(timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
