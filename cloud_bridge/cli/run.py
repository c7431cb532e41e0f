"""`cloud-bridge run`: the bridge itself (ingestion, escalation answers, TSDB, OTA, rollouts) until
SIGTERM or SIGINT, then a drain and exit 0."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from cloud_bridge.app import run_bridge
from cloud_bridge.cli.common import Commands, command
from cloud_bridge.config import load_config


def add_subparsers(sub: Commands) -> None:
    parser = sub.add_parser(
        "run",
        help="run the bridge until SIGTERM/SIGINT (then drain and exit 0)",
        description="Subscribe to the fleet's topics, store what devices send, answer escalations with the "
        "cloud model, and drive OTA commands and rollouts, until SIGTERM or SIGINT; then finish what "
        "arrived and exit 0.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the bridge's TOML config file; every key is optional (without a file: the defaults, and "
        "CLOUD_BRIDGE_<SECTION>__<KEY> environment variables)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO"
    )
    command(parser, "run", _run)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(run_bridge(load_config(args.config)))
    return 0
