"""Lifecycle of one child server process (spawn, graceful stop, hard kill) shared by the dev servers.

The dev servers (mosquitto, victoria-metrics) differ in their command lines and readiness checks but
must all be stopped the same way and never outlive the Python process that started them.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import weakref
from pathlib import Path

log = logging.getLogger(__name__)


def _reap(proc: subprocess.Popen[bytes], name: str) -> None:
    """Last-resort kill when the owner was garbage-collected or the interpreter exits."""
    if proc.poll() is None:
        log.warning("killing orphan server name=%s pid=%d", name, proc.pid)
        proc.kill()
        proc.wait(timeout=10)


class ManagedProcess:
    """One child process whose stdout and stderr go to `console_log`.

    A `weakref.finalize` kills it if its owner forgets to, including at interpreter exit, so a failed
    test or a crashed bench script does not leave a broker listening.
    """

    def __init__(self, name: str, console_log: Path) -> None:
        self.name = name
        self.console_log = console_log
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes], str], ManagedProcess] | None = None

    @property
    def popen(self) -> subprocess.Popen[bytes] | None:
        return self._proc

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def launch(self, argv: list[str]) -> subprocess.Popen[bytes]:
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.console_log.parent.mkdir(parents=True, exist_ok=True)
        with self.console_log.open("ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self._proc = proc
        self._finalizer = weakref.finalize(self, _reap, proc, self.name)
        log.info("started server name=%s pid=%d argv=%s", self.name, proc.pid, " ".join(argv))
        return proc

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait so the server saves its state; SIGKILL if it does not exit in time."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("server ignored SIGTERM name=%s pid=%d timeout_s=%.1f", self.name, proc.pid, timeout)
                proc.kill()
                proc.wait(timeout=10)
        return self._forget(proc)

    def kill(self) -> int | None:
        """SIGKILL: the server gets no chance to save anything (a simulated crash or power cut)."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        return self._forget(proc)

    def _forget(self, proc: subprocess.Popen[bytes]) -> int | None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        log.info("server exited name=%s pid=%d rc=%s", self.name, proc.pid, proc.returncode)
        return proc.returncode
