"""`cloud-bridge check`: the bridge's diagnosis (cloud_bridge/check.py), one line per check."""

from __future__ import annotations

import argparse
import asyncio
import sys

from cloud_bridge.check import CONFIG, diagnose
from cloud_bridge.cli.common import Commands, add_config, command
from common.checks import render


def add_subparsers(sub: Commands) -> None:
    parser = sub.add_parser(
        "check",
        help="diagnose the configuration, disk, keys, models, registry, TSDB and broker, then exit",
        description="One line per check: ok, warn or fail with what was found and the fix, or skip when a "
        "check it needs failed. Nothing is changed: the registry is inspected, not migrated; the TSDB gets "
        "one probe point; the broker checks use a client id, topic and share group of their own. Exit 0 "
        "when nothing failed, 1 when a check failed, 2 when the configuration does not load.",
    )
    add_config(parser, "all of it")
    command(parser, "check", _check)


def _check(args: argparse.Namespace) -> int:
    checks = asyncio.run(diagnose(args.config))
    sys.stdout.write(render(checks.findings))
    if checks.status(CONFIG) == "fail":
        return 2
    return 1 if checks.failed else 0
