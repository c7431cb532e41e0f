"""TCP port helpers for the local dev servers: pick a free port, wait until a server accepts on it.

Used by the real-server harness (tests, bench/ scripts and `make demo`) so that every server it starts
listens on its own ephemeral port and never collides with the stock services of the machine.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import time
from collections.abc import Collection
from pathlib import Path

log = logging.getLogger(__name__)

_POLL_INTERVAL_S = 0.02
_LOG_TAIL_CHARS = 4000


class PortWaitError(TimeoutError):
    """The server did not accept TCP connections in time, or its process exited first."""


def free_port(host: str = "127.0.0.1", avoid: Collection[int] = ()) -> int:
    """Return a TCP port on `host` that nothing listens on right now, and not one of `avoid`.

    The kernel picks it (bind to port 0); there is a short window before the caller binds it, which is
    why servers started on it check that *their own* process is alive once the port accepts. Ports
    chosen for one server but not bound yet must be passed as `avoid`: once a probe socket closed,
    the kernel may hand out the same port again (seen: a broker given one port for two listeners).
    """
    while True:
        (port,) = free_ports(1, host)
        if port not in avoid:
            return port


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free TCP ports on `host` (all probe sockets are held until every one is chosen)."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a TCP connection to host:port succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path | None, chars: int = _LOG_TAIL_CHARS) -> str:
    """The last `chars` characters of a text file, or a note saying why there is none."""
    if path is None:
        return "<no log file>"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return f"<{path} does not exist>"
    return text[-chars:]


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    *,
    name: str = "server",
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Block until host:port accepts a TCP connection, at most `timeout` seconds.

    When `process` is given, fail as soon as it exits (a crashed server never opens its port). The
    error names the server and carries the tail of `log_path`, which usually says what went wrong.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise PortWaitError(
                f"{name} (pid {process.pid}) exited with code {process.returncode} before listening on "
                f"{host}:{port}; log {log_path}:\n{tail(log_path)}"
            )
        if port_accepts(host, port, timeout=max(0.05, min(0.5, deadline - time.monotonic()))):
            log.debug("port accepts name=%s host=%s port=%d", name, host, port)
            return
        if time.monotonic() >= deadline:
            raise PortWaitError(
                f"{name} did not accept connections on {host}:{port} within {timeout:.1f}s; "
                f"log {log_path}:\n{tail(log_path)}"
            )
        # Polling a port that is not open yet has no event to wait on; the interval bounds the latency.
        time.sleep(_POLL_INTERVAL_S)
