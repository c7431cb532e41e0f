"""`edge-node`: the device daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from common import logs
from edge_node import __version__
from edge_node.errors import ConfigError, EdgeError

DESCRIPTION = """\
Edge inference node: runs an ONNX classifier on inputs from MQTT, a directory or a dataset replay,
answers confident inputs locally, escalates unsure ones to the cloud model over MQTT (falling back
to the local answer on timeout or while offline), samples uncertain inputs for labeling and
publishes telemetry. Every outbound message is stored in a durable SQLite outbox until the broker
acknowledged it.

Configuration: a TOML file (see examples/edge.toml); any key can be overridden with an environment
variable EDGE_NODE__SECTION__KEY, e.g. EDGE_NODE__MQTT__HOST=gateway.local.
"""


async def _run(config_path: Path) -> int:
    from edge_node.app import EdgeNode
    from edge_node.config import load_config

    config = load_config(config_path)
    node = EdgeNode(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, node.stop)
    await node.run()
    return 0


def _check(config_path: Path) -> int:
    """Print one line per check; exit 0 when none failed, 2 when the config does not load, else 1."""
    from common.checks import render
    from edge_node.check import CONFIG, diagnose

    checks = asyncio.run(diagnose(config_path))
    sys.stdout.write(render(checks.findings))
    if checks.status(CONFIG) == "fail":
        return 2
    return 1 if checks.failed else 0


def _edge_error(exc: BaseException) -> EdgeError | None:
    """The EdgeError behind `exc`: itself, or the first of a task group's errors when every one is an
    EdgeError (a failure inside the node's TaskGroup arrives wrapped); None for anything else."""
    if isinstance(exc, EdgeError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found = [_edge_error(e) for e in exc.exceptions]
        if found and all(e is not None for e in found):
            return found[0]
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-node", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"edge-node {__version__}")
    logs.add_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the node until SIGTERM/SIGINT (then drain and exit 0)")
    run.add_argument("--config", type=Path, required=True, help="TOML configuration file")
    check = sub.add_parser(
        "check",
        help="diagnose the configuration, model, disk, broker, TLS, credentials and keys, then exit",
        description="One line per check: ok, warn or fail with what was found and the fix, or skip when a "
        "check it needs failed. Exit 0 when nothing failed, 1 when a check failed, 2 when the configuration "
        "does not load. The broker checks log in with their own client id; on a broker that makes the user "
        "name the client id, run it while the node is stopped.",
    )
    check.add_argument("--config", type=Path, required=True, help="TOML configuration file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        if args.command == "check":
            return _check(args.config)
        return asyncio.run(_run(args.config))
    except BaseException as exc:
        error = _edge_error(exc)
        if error is None:
            raise
        # A user's error, not a bug: one line with the fix, no traceback.
        print(f"edge-node {args.command}: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1


if __name__ == "__main__":
    raise SystemExit(main())
