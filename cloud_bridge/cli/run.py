"""`cloud-bridge run`: the bridge itself (ingestion, escalation answers, TSDB, OTA, rollouts) until
SIGTERM or SIGINT, then a drain and exit 0."""

from __future__ import annotations

import argparse
import asyncio

from cloud_bridge.app import run_bridge
from cloud_bridge.cli.common import Commands, add_config, command
from cloud_bridge.config import load_config
from common import logs


def add_subparsers(sub: Commands) -> None:
    parser = sub.add_parser(
        "run",
        help="run the bridge until SIGTERM/SIGINT (then drain and exit 0)",
        description="Subscribe to the fleet's topics, store what devices send, answer escalations with the "
        "cloud model, and drive OTA commands and rollouts, until SIGTERM or SIGINT; then finish what "
        "arrived and exit 0.",
    )
    add_config(parser, "every key is optional in it; CLOUD_BRIDGE__<SECTION>__<KEY> variables override it")
    logs.add_arguments(parser)
    command(parser, "run", _run)


def _run(args: argparse.Namespace) -> int:
    logs.setup(args.log_level, args.log_format)
    asyncio.run(run_bridge(load_config(args.config)))
    return 0
