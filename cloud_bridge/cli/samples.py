"""`cloud-bridge samples export|tail`: archived uncertain samples for labelers, and a live view.

`export` writes a slice of the archive (cloud_bridge/samples/archive.py) as files a labeling tool
imports (cloud_bridge/samples/export.py); `tail` prints samples as devices send them
(cloud_bridge/samples/tail.py).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cloud_bridge.cli import labels
from cloud_bridge.cli.common import Commands, add_config, command, parse_when, require_registry
from cloud_bridge.config import BridgeConfig, load_config
from cloud_bridge.errors import UsageError
from cloud_bridge.registry import Registry
from cloud_bridge.samples.export import ExportFilter, ExportOptions, ExportStats, export_resuming, summarize
from cloud_bridge.samples.tail import TailOptions, TailStats, tail_samples
from schemas.errors import TopicError
from schemas.topics import validate_id

LAST = "last"
REASONS = ("entropy", "margin")


def parse_model(text: str | None) -> tuple[str | None, str | None]:
    """`NAME` or `NAME@VERSION`."""
    if text is None:
        return None, None
    name, _, version = text.partition("@")
    if not name:
        raise UsageError(f"--model {text!r}: give NAME or NAME@VERSION, e.g. digits-edge@1.0.0")
    return name, version or None


def add_subparsers(sub: Commands) -> None:
    samples = sub.add_parser(
        "samples",
        help="export archived uncertain samples for labelers, or watch them live",
        description="Uncertain inputs that devices sent for labeling (topic fleet/FLEET/DEVICE/samples). "
        "See README 'Samples for labelers' for the payload and the export format.",
    )
    ssub = samples.add_subparsers(dest="samples_command", required=True)
    _add_export(ssub)
    _add_tail(ssub)
    labels.add_subparsers(ssub)


def _add_export(ssub: Commands) -> None:
    export = ssub.add_parser(
        "export",
        help="write archived samples as .npy (+ .png) files with a JSONL manifest",
        description="Writes DIR/inputs/MSG_ID.npy (and .png for image-shaped inputs) and appends one JSON line "
        "per sample to DIR/manifest.jsonl. Re-running skips samples already in the manifest. Times are ISO 8601 "
        "(no zone = UTC), unix seconds, or an age such as 2h or 7d; --since last resumes after the last sample "
        "exported to DIR with the same --fleet/--device/--model/--reason (the first run exports everything).",
    )
    add_config(export, "state_dir, [registry]")
    export.add_argument("--since", required=True, help="device time lower bound (inclusive), or 'last'")
    export.add_argument("--until", default=None, help="device time upper bound (exclusive)")
    export.add_argument("--fleet", default=None, help="only this fleet id")
    export.add_argument("--device", default=None, help="only this device id")
    export.add_argument("--model", default=None, help="only this edge model: NAME or NAME@VERSION")
    export.add_argument("--reason", choices=REASONS, default=None, help="only samples sent for this reason")
    export.add_argument("--limit", type=int, default=None, help="at most this many samples (in archive order)")
    export.add_argument("--out", type=Path, required=True, help="export directory (created if missing)")
    export.add_argument(
        "--format",
        choices=("jsonl", "label-studio"),
        default="jsonl",
        help="label-studio also writes DIR/label-studio.json: the tasks of the samples this run added (new since "
        "the last export into DIR), to import into Label Studio",
    )
    export.add_argument(
        "--image-url-prefix",
        default="",
        help="prepended to file paths in label-studio.json, e.g. '/data/local-files/?d=exports/week48/'",
    )
    export.add_argument(
        "--png-zoom", type=int, default=0, help="integer upscale of PNGs (0 = auto: longer side >= 64 px)"
    )
    export.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    command(export, "samples export", _export)


def _add_tail(ssub: Commands) -> None:
    tail = ssub.add_parser(
        "tail",
        help="print samples live as devices send them (until Ctrl-C)",
        description="Subscribes with its own client id and a clean session (not the bridges' shared "
        "subscription, so it takes nothing away from them) and prints one line per sample. Invalid payloads "
        "are reported on stderr and skipped.",
    )
    add_config(tail, "[mqtt], [fleet]")
    tail.add_argument("--fleet", default="+", help="only this fleet id (default: all)")
    tail.add_argument("--device", default="+", help="only this device id (default: all)")
    tail.add_argument("--count", type=int, default=None, help="exit after this many samples")
    tail.add_argument("--json", action="store_true", help="print each sample payload as received (JSON lines)")
    command(tail, "samples tail", _tail)


def _check_ids(args: argparse.Namespace) -> None:
    for kind in ("fleet", "device"):
        value = getattr(args, kind)
        if value not in (None, "+"):
            try:
                validate_id(f"--{kind}", value)
            except TopicError as exc:
                raise UsageError(str(exc)) from None


def _load(args: argparse.Namespace) -> BridgeConfig:
    config = load_config(args.config)
    if args.samples_command in ("export", "labels"):
        require_registry(config)
    return config


@dataclass(frozen=True)
class _ExportRequest:
    flt: ExportFilter
    options: ExportOptions
    resume: bool
    quiet: bool


def _export_request(args: argparse.Namespace) -> _ExportRequest:
    now = time.time()
    resume = args.since.strip().lower() == LAST
    if resume and args.until is not None:
        raise UsageError("--until cannot be combined with --since last (the cursor follows archive order)")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit {args.limit} must be a positive number of samples")
    name, version = parse_model(args.model)
    flt = ExportFilter(
        since=None if resume else parse_when(args.since, now),
        until=None if args.until is None else parse_when(args.until, now),
        fleet=args.fleet,
        device=args.device,
        model_name=name,
        model_version=version,
        reason=args.reason,
    )
    options = ExportOptions(
        out_dir=args.out,
        limit=args.limit,
        png_zoom=args.png_zoom,
        label_studio=args.format == "label-studio",
        image_url_prefix=args.image_url_prefix,
    )
    return _ExportRequest(flt, options, resume, args.quiet)


def _export(args: argparse.Namespace) -> int:
    _check_ids(args)
    config = _load(args)
    request = _export_request(args)
    stats = asyncio.run(_run_export(config, request))
    for warning in stats.warnings:
        print(f"cloud-bridge samples export: warning: {warning}", file=sys.stderr)
    print(f"exported to {request.options.out_dir}: {summarize(stats)}")
    return 0


async def _run_export(config: BridgeConfig, request: _ExportRequest) -> ExportStats:
    def progress(stats: ExportStats) -> None:
        if not request.quiet:
            print(f"cloud-bridge samples export: {summarize(stats)}", file=sys.stderr, flush=True)

    registry = Registry(config.registry_url)
    try:
        return await export_resuming(registry, request.flt, request.options, resume=request.resume, progress=progress)
    finally:
        await registry.close()


def _tail(args: argparse.Namespace) -> int:
    _check_ids(args)
    config = _load(args)
    if args.count is not None and args.count <= 0:
        raise UsageError(f"--count {args.count} must be a positive number of samples")
    options = TailOptions(fleet=args.fleet, device=args.device, count=args.count, as_json=args.json)
    return asyncio.run(_run_tail(config, options))


async def _run_tail(config: BridgeConfig, options: TailOptions) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def emit(line: str) -> None:
        print(line, flush=True)

    def warn(line: str) -> None:
        print(f"cloud-bridge samples tail: {line}", file=sys.stderr, flush=True)

    def subscribed(topic: str) -> None:
        warn(f"subscribed to {topic} on {config.mqtt.host}:{config.mqtt.port}")

    stats = TailStats()
    tail = asyncio.create_task(tail_samples(config, options, emit, warn, subscribed, stats))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({tail, stopped}, return_when=asyncio.FIRST_COMPLETED)
    # Ctrl-C / SIGTERM is the normal way to end a tail without --count: exit 0 either way.
    for task in (tail, stopped):
        task.cancel()
    await asyncio.gather(tail, stopped, return_exceptions=True)
    warn(f"printed {stats.printed} samples, {stats.invalid} invalid payloads skipped")
    failure = None if tail.cancelled() else tail.exception()
    if failure is not None:
        raise failure
    return 0
