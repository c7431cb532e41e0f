"""The `cloud-bridge` command: one module per command group (run, check, keys, models, cmd, rollout,
samples, devices, alerts) adds its parsers; `main` runs the command and reports every BridgeError once.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import sys

from cloud_bridge import __version__
from cloud_bridge.cli import alerts, check, cmd, devices, improve, keys, models, rollout, run, samples
from cloud_bridge.errors import BridgeError, ConfigError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloud-bridge",
        description="Ingest fleet MQTT traffic into a registry and InfluxDB, and answer escalations "
        "with the cloud model. Every config key can be overridden with CLOUD_BRIDGE__<SECTION>__<KEY>.",
    )
    parser.add_argument("--version", action="version", version=f"cloud-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (run, check, keys, models, cmd, rollout, samples, devices, alerts, improve):
        group.add_subparsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (a BridgeError's `exit_code` when it raised one)."""
    args = build_parser().parse_args(argv)
    if args.command != "run":  # `run` logs in its own format, at its --log-level
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        code: int = args.handler(args)
        sys.stdout.flush()  # a reader that went away shows here, not as the interpreter exits
    except BrokenPipeError:
        # The reader of our output went away (`cloud-bridge models list | head -1`): it has what it
        # wanted, so stop without a traceback. Anything else that broke a pipe is not ours to hide.
        if not _stdout_broken():
            raise
        return 0
    except BaseException as exc:
        error = bridge_error(exc)
        if error is None:
            raise
        kind = "config error: " if isinstance(error, ConfigError) else ""
        print(f"cloud-bridge {args.command_name}: {kind}{error}", file=sys.stderr)
        return error.exit_code
    return code


def bridge_error(exc: BaseException) -> BridgeError | None:
    """The BridgeError behind `exc`: itself, or the first of a task group's errors when every one is
    a BridgeError (`run` fails inside a TaskGroup, which wraps them); None for anything else."""
    if isinstance(exc, BridgeError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found = [bridge_error(e) for e in exc.exceptions]
        if found and all(e is not None for e in found):
            return found[0]
    return None


def _stdout_broken() -> bool:
    """Whether stdout's reader is gone (poll reports an error on a pipe or socket without a peer); if
    so, stdout now writes to /dev/null, so the interpreter's last flush does not fail on it again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without a descriptor
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not any(events & select.POLLERR for _, events in poller.poll(0)):
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return True
