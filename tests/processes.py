"""Programs run as real processes by tests: `edge-node run`, `cloud-bridge ...`, a Python snippet.

Each is a devservers `ManagedProcess` whose output goes to a log file (a full pipe can never block
it) and which is killed when its `with` block ends, so a child that got stuck never outlives its
test; stopping it on purpose (SIGTERM and the exit code) is the test's business, with the log's end
in the failure message.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from devservers import ManagedProcess
from tests.poll import wait_for

EDGE_NODE = [sys.executable, "-m", "edge_node.cli"]
CLOUD_BRIDGE = [sys.executable, "-m", "cloud_bridge.cli"]


@contextmanager
def running(
    name: str,
    argv: list[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    stdin_pipe: bool = False,
    stdout_pipe: bool = False,
) -> Iterator[ManagedProcess]:
    """`argv` as a process for the block, in this environment plus `env` (see `ManagedProcess.launch`
    for the pipes)."""
    with ManagedProcess(name, log) as proc:
        proc.launch(argv, env={**os.environ, **(env or {})}, stdin_pipe=stdin_pipe, stdout_pipe=stdout_pipe)
        yield proc


def run_edge_node(config_file: Path, log: Path, name: str = "edge-node") -> AbstractContextManager[ManagedProcess]:
    """`edge-node run --config config_file` for the block; unbuffered, so its log is current."""
    return running(name, [*EDGE_NODE, "run", "--config", str(config_file)], log, env={"PYTHONUNBUFFERED": "1"})


def run_cloud_bridge(config_file: Path, log: Path) -> AbstractContextManager[ManagedProcess]:
    """`cloud-bridge run --config config_file` for the block."""
    return running("cloud-bridge", [*CLOUD_BRIDGE, "run", "--config", str(config_file)], log)


def stop(proc: ManagedProcess, timeout: float = 30.0) -> None:
    """SIGTERM, and the process must drain and exit 0 within `timeout` (else it is killed)."""
    rc = proc.terminate(timeout)
    assert rc == 0, f"{proc.name} exited with {rc} after SIGTERM\n{proc.log_tail()}"


def wait_logged(proc: ManagedProcess, text: str, within: float = 20.0) -> None:
    """Wait until the process's log shows `text`; fail at once, with its log, if it exits first."""

    def logged() -> bool:
        if not proc.alive:
            raise AssertionError(f"{proc.name} exited ({proc.returncode}) before logging {text!r}\n{proc.log_tail()}")
        return text in proc.log_text()

    # The log is the only signal a program gives from outside; polled, bounded.
    wait_for(logged, within, lambda: f"{proc.name} to log {text!r}\n{proc.log_tail()}")
