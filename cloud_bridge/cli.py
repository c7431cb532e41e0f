"""`cloud-bridge run --config FILE`: the cloud side of the fleet (ingestion, escalation answers, TSDB)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from cloud_bridge.app import run_bridge
from cloud_bridge.config import load_config
from cloud_bridge.errors import ConfigError
from cloud_bridge.models import quantize
from cloud_bridge.models import store as models
from cloud_bridge.ota import commands, keys
from cloud_bridge.rollout import cli as rollout_cli
from cloud_bridge.samples import cli as samples


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloud-bridge",
        description="Ingest fleet MQTT traffic into a registry and InfluxDB, and answer escalations "
        "with the cloud model. Every config key can be overridden with CLOUD_BRIDGE_<SECTION>__<KEY>.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the bridge until SIGTERM/SIGINT (then drain and exit 0)")
    run.add_argument("--config", type=Path, default=None, help="TOML config file (see cloud_bridge/config.py)")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    for ota_module in (keys, models, commands):  # OTA: keys generate, models add|list, cmd update|rollback|ping
        ota_module.add_subparsers(sub)
    samples.add_subparsers(sub)  # samples export|tail (labelers)
    for rollout_module in (quantize, rollout_cli):  # models quantize (after models), rollout start|status|abort
        rollout_module.add_subparsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is not None:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        try:
            code: int = handler(args)
        except ConfigError as exc:
            print(f"cloud-bridge: config error: {exc}", file=sys.stderr)
            return 2
        return code
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"cloud-bridge: config error: {exc}", file=sys.stderr)
        return 2
    asyncio.run(run_bridge(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
