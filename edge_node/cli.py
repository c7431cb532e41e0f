"""`edge-node`: the device daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from common import logs
from edge_node import __version__
from edge_node.errors import EdgeError

log = logging.getLogger("edge_node")

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
    from edge_node.config import load_config
    from edge_node.inference.model import Classifier

    config = load_config(config_path)
    classifier = Classifier.load(config.model.path, config.model.providers, config.model.intra_op_threads)
    info = classifier.info
    print(
        f"config ok: fleet={config.device.fleet_id} device={config.device.device_id} "
        f"broker={config.mqtt.host}:{config.mqtt.port} source={config.source.kind}"
    )
    print(
        f"model ok: {info.ref.name} {info.ref.version} sha256={info.ref.sha256[:16]} input={list(info.feature_shape)} "
        f"{info.input_dtype} classes={len(info.labels)} output={info.output_kind}"
    )
    print(
        f"providers: requested={list(classifier.providers.requested)} active={list(classifier.providers.active)}"
        + ("  WARNING: fell back to CPU" if classifier.providers.fallback else "")
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-node", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"edge-node {__version__}")
    logs.add_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the node until SIGTERM/SIGINT (then drain and exit 0)")
    run.add_argument("--config", type=Path, required=True, help="TOML configuration file")
    check = sub.add_parser("check", help="validate the configuration and load the model, then exit")
    check.add_argument("--config", type=Path, required=True, help="TOML configuration file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        if args.command == "check":
            return _check(args.config)
        return asyncio.run(_run(args.config))
    except EdgeError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
