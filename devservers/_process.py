"""Lifecycle of one child process (spawn, graceful stop, hard kill, exit code, log) shared by the dev
servers and by tests that run the project's programs (edge-node, cloud-bridge) as real processes.

The dev servers (mosquitto, victoria-metrics) differ in their command lines and readiness checks but
must all be stopped the same way and never outlive the Python process that started them.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

# How much of a log a failure message carries: the end, where the reason usually is.
_TAIL_LINES = 40


class ProcessError(RuntimeError):
    """A managed process did not do what its owner waited for (e.g. it did not exit in time)."""


def _reap(proc: subprocess.Popen[bytes], name: str) -> None:
    """Last-resort kill when the owner was garbage-collected or the interpreter exits; closes the
    pipes of a process that has already exited."""
    if proc.poll() is None:
        log.warning("killing orphan server name=%s pid=%d", name, proc.pid)
        proc.kill()
        proc.wait(timeout=10)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


class ManagedProcess:
    """One child process whose stderr (and stdout, unless piped) goes to `console_log`.

    A `weakref.finalize` kills it if its owner forgets to, including at interpreter exit, so a failed
    test or a crashed bench script does not leave a broker listening. As a context manager, leaving
    the block kills whatever is still running: a child that got stuck never outlives its test.
    """

    def __init__(self, name: str, console_log: Path) -> None:
        self.name = name
        self.console_log = console_log
        self._proc: subprocess.Popen[bytes] | None = None
        # Runs _reap for the current process: at garbage collection, at exit, or when it is replaced.
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes], str], ManagedProcess] | None = None
        self._exit_logged = False

    @property
    def popen(self) -> subprocess.Popen[bytes] | None:
        return self._proc

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit code (negative: the signal that ended it); None while running or before launch."""
        return None if self._proc is None else self._proc.poll()

    def launch(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdin_pipe: bool = False,
        stdout_pipe: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` (appending its output to `console_log`, so a restart keeps the earlier run's).

        `stdin_pipe`: the child reads a pipe (closed when it stops) instead of /dev/null.
        `stdout_pipe`: the caller reads stdout from `popen.stdout`; only stderr goes to the log.
        """
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        if self._finalizer is not None:
            self._finalizer()  # the previous run's pipes
        self.console_log.parent.mkdir(parents=True, exist_ok=True)
        with self.console_log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else out,
                stderr=out if stdout_pipe else subprocess.STDOUT,
                env=None if env is None else dict(env),
                cwd=cwd,
            )
        self._proc, self._exit_logged = proc, False
        self._finalizer = weakref.finalize(self, _reap, proc, self.name)
        log.info("started server name=%s pid=%d argv=%s", self.name, proc.pid, " ".join(argv))
        return proc

    def send_signal(self, sig: signal.Signals) -> None:
        """Deliver `sig` if the process still runs (a stop request the caller then waits on)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit code once it exits by itself; if it has not within `timeout` seconds, it is killed
        and ProcessError is raised with the end of its log."""
        proc = self._require()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ProcessError(f"{self.name} did not exit within {timeout:g} s (killed)\n{self.log_tail()}") from None
        return self._forget(proc)

    def terminate(self, timeout: float = 10.0, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """SIGTERM (or `sig`) and wait so the process saves its state; SIGKILL if it does not exit in
        time. Returns the exit code: the signal's negative number tells that it had to be killed."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("server ignored %s name=%s pid=%d timeout_s=%.1f", sig.name, self.name, proc.pid, timeout)
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

    def log_text(self) -> str:
        """Everything in `console_log` so far (every run of this process), "" before the first."""
        try:
            return self.console_log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = _TAIL_LINES) -> str:
        """The end of `console_log`, headed by its path: for failure messages."""
        last = self.log_text().splitlines()[-lines:]
        return "\n".join([f"--- {self.name} log {self.console_log} (last {len(last)} lines) ---", *last])

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()
        if self._finalizer is not None:
            self._finalizer()  # closes the pipes now rather than at garbage collection

    def _require(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError(f"{self.name} was never launched")
        return self._proc

    def _forget(self, proc: subprocess.Popen[bytes]) -> int:
        """Record the exit. A piped stdout stays open: what the process wrote before it ended can
        still be read (the finalizer closes it)."""
        assert proc.returncode is not None
        if not self._exit_logged:
            self._exit_logged = True
            log.info("server exited name=%s pid=%d rc=%s", self.name, proc.pid, proc.returncode)
        if proc.stdin is not None:
            proc.stdin.close()
        return proc.returncode
