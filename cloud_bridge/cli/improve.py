"""`cloud-bridge improve start|status|abort|run`: the improvement loop (cloud_bridge/improve).

`start` records a loop in the registry (its options default to the config's `[improve]`); `run` is the
worker that drives loops, and with `[improve] auto` (or `--auto`) starts them (training runs there, not
in the ingesting bridge, unless `[improve] in_bridge` puts the same worker in the bridge); `start --wait`
drives it in the same process until it waits for its rollout (which the bridges' rollout drivers run)
or ends. State lives in the registry only: a worker
killed at any point is replaced by the next `run`, which resumes the loop at the phase it recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from cloud_bridge.cli.common import Commands, add_config, command, open_registry, print_table
from cloud_bridge.config import BridgeConfig, load_config
from cloud_bridge.errors import UsageError
from cloud_bridge.improve.escalation_value import EscalationValue, assess, record_advice
from cloud_bridge.improve.store import ImproveError, LoopStore, NewLoop
from cloud_bridge.improve.trigger import drifted_devices, human_labels
from cloud_bridge.improve.worker import ImproveWorker
from cloud_bridge.models.lineage import get_lineage
from cloud_bridge.models.store import ModelStore
from cloud_bridge.registry import Registry
from cloud_bridge.rollout.policy import parse_thresholds
from cloud_bridge.rollout.stages import parse_stages
from cloud_bridge.samples.datasets import dataset_counts
from cloud_bridge.tsdb import TsdbSettings, TsdbWriter


def add_subparsers(sub: Commands) -> None:
    improve = sub.add_parser(
        "improve",
        help="retrain the edge model on labeled drifted samples, gate it, and roll it out",
        description="The loop from a drift alert to a better model: dataset version -> trainer -> INT8 -> "
        "evaluation gate -> canary rollout -> promote or roll back. See docs/improve.md.",
    )
    isub = improve.add_subparsers(dest="improve_command", required=True)
    start = isub.add_parser("start", help="start a loop for the drifted devices of a fleet")
    add_config(start, "state_dir, [registry], [ota] model_store")
    start.add_argument("--fleet", required=True, help="fleet id")
    start.add_argument("--device", action="append", default=None, help="a drifted device (repeatable)")
    start.add_argument(
        "--from-alerts",
        action="store_true",
        help="take the devices whose drift alert on --base is firing now (with --min-human labels on them)",
    )
    start.add_argument("--base", required=True, help="the model to improve, NAME@VERSION (the devices' current)")
    start.add_argument("--teacher", default=None, help="NAME@VERSION to pseudo-label unlabeled samples with")
    start.add_argument("--min-confidence", type=float, default=None, help="of pseudo-labels ([improve], 0.95)")
    start.add_argument("--min-human", type=int, default=None, help="human labels needed ([improve], 50)")
    start.add_argument("--holdout", type=float, default=None, help="human labels kept for the gate ([improve], 0.3)")
    start.add_argument(
        "--min-gain", type=float, default=None, help="accuracy gain needed on the drifted holdout ([improve], 0.02)"
    )
    start.add_argument(
        "--max-loss", type=float, default=None, help="accuracy loss allowed on the original test set ([improve], 0.005)"
    )
    start.add_argument("--stages", default=None, help="rollout stages, percent ([improve], default shadow:100,25,100)")
    start.add_argument(
        "--thresholds",
        action="append",
        default=[],
        help="threshold overrides for the rollout, as `rollout start --thresholds` takes them ([improve] thresholds)",
    )
    start.add_argument("--window-s", type=float, default=None, help="rollout watch window, seconds ([improve], 600)")
    start.add_argument(
        "--trainer", default=None, help="trainer command ([improve]; default: python -m demokit.retrain)"
    )
    start.add_argument("--wait", action="store_true", help="drive the loop here until it waits for its rollout")
    command(start, "improve start", _start)
    status = isub.add_parser("status", help="every loop, or one in detail (phase, dataset, gate, rollout)")
    add_config(status, "state_dir, [registry]")
    status.add_argument("loop", nargs="?", default=None, help="a loop id (or unique prefix) for details")
    status.add_argument("--json", action="store_true", help="print the rows as JSON")
    command(status, "improve status", _status)
    abort = isub.add_parser("abort", help="stop a running loop (its rollout, if any, is left to `rollout abort`)")
    add_config(abort, "state_dir, [registry]")
    abort.add_argument("loop", help="a loop id or unique prefix")
    command(abort, "improve abort", _abort)
    run = isub.add_parser(
        "run",
        help="the worker: drive every running loop until stopped (Ctrl-C); [improve] auto starts them too",
    )
    add_config(run, "state_dir, [registry], [ota] model_store, [improve]")
    run.add_argument("--tick-s", type=float, default=None, help="seconds between passes ([improve] tick_s, 5)")
    run.add_argument("--once", action="store_true", help="one pass, then exit")
    run.add_argument(
        "--auto",
        action="store_true",
        help="also start loops by themselves (as [improve] auto = true): devices with a firing drift alert and "
        "--min-human labels",
    )
    run.add_argument(
        "--fleet", action="append", default=None, help="a fleet --auto watches ([improve] fleets; default: every one)"
    )
    run.add_argument("--min-human", type=int, default=None, help="labels --auto needs ([improve] min_human, 50)")
    run.add_argument(
        "--cooldown-s",
        type=float,
        default=None,
        help="--auto waits this long after a loop of a model ended ([improve] cooldown_s, 3600)",
    )
    command(run, "improve run", _run)
    value = isub.add_parser(
        "escalation",
        help="per device and model version: is the cloud model better than the edge on labeled samples?",
        description="Scores the edge's answer and the cloud model's answer against human labels of the archived "
        "(uncertain) samples, per device and edge model version: 'does_not_help' means escalating there costs "
        "bytes without better answers.",
    )
    add_config(value, "state_dir, [registry], [ota] model_store")
    value.add_argument("--cloud", required=True, help="the cloud model, NAME@VERSION")
    value.add_argument("--min-samples", type=int, default=30, help="labels needed for a verdict (30)")
    value.add_argument(
        "--min-gain", type=float, default=0.0, help="the cloud must be this much more accurate to help (0)"
    )
    value.add_argument(
        "--apply",
        type=float,
        default=None,
        metavar="PAUSE_S",
        help="store the verdicts: escalation replies to 'does_not_help' devices then carry pause_s = PAUSE_S",
    )
    command(value, "improve escalation", _escalation)


def _worker(config: BridgeConfig, registry: Registry, tsdb: TsdbWriter | None = None, **improve: Any) -> ImproveWorker:
    """A worker of this process; `improve` overrides `[improve]` keys (the command line's flags)."""
    owner = f"improve-{socket.gethostname()}-{os.getpid()}"
    settings = dataclasses.replace(config.improve, **{k: v for k, v in improve.items() if v is not None})
    try:
        settings.validate()
    except ValueError as exc:
        raise UsageError(f"[improve] with the command line's flags: {exc}") from None
    models = ModelStore(config.model_store_dir, registry)
    return ImproveWorker.for_bridge(config, registry, models, owner, tsdb, settings)


def _tsdb(config: BridgeConfig) -> TsdbWriter | None:
    """The worker's own writer for `improve_loop` points ([influx] of the bridge config; its spill apart
    from the bridge's, under state_dir/improve)."""
    if config.influx.url is None:
        return None
    return TsdbWriter(TsdbSettings.from_config(config.influx, Path(config.state_dir) / "improve"))


def _ref(text: str, option: str) -> tuple[str, str]:
    name, _, version = text.partition("@")
    if not name or not version:
        raise UsageError(f"{option} {text!r}: give NAME@VERSION, e.g. digits-edge@1.0.0")
    return name, version


def _start(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    name, version = _ref(args.base, "--base")
    if args.teacher:
        _ref(args.teacher, "--teacher")
    if bool(args.device) == args.from_alerts:
        raise UsageError("give the drifted devices with --device, or --from-alerts to take them from drift alerts")
    if args.holdout is not None and not 0.0 < args.holdout < 1.0:
        raise UsageError(f"--holdout {args.holdout} must be in (0, 1)")
    if args.stages is not None:
        parse_stages(args.stages)  # a bad value is named as the flag, not as [improve] stages
    # Each flag given overrides its [improve] key for this loop; the rest are the config's.
    flags = {
        "teacher": args.teacher,
        "min_confidence": args.min_confidence,
        "min_human": args.min_human,
        "holdout": args.holdout,
        "min_gain": args.min_gain,
        "max_loss": args.max_loss,
        "stages": args.stages,
        "window_s": args.window_s,
        "trainer": args.trainer,
    }
    settings = dataclasses.replace(config.improve, **{k: v for k, v in flags.items() if v is not None})
    if args.thresholds:
        parse_thresholds(args.thresholds)  # a bad value is named as the flag's
        settings = dataclasses.replace(settings, thresholds=tuple(args.thresholds))
    options = settings.loop_options()
    min_human = settings.min_human

    async def run() -> str:
        async with open_registry(config) as registry:
            await ModelStore(config.model_store_dir, registry).get(name, version)
            devices = args.device or await drifted_devices(registry, args.fleet, name, version)
            if not devices:
                return f"no drift alert on {name} {version} is firing in fleet {args.fleet}: nothing to improve"
            labels = await human_labels(registry, args.fleet, devices)
            if labels < min_human:
                raise ImproveError(
                    f"{len(devices)} drifted device(s) ({', '.join(devices)}) have {labels} human labels, "
                    f"{min_human} needed: export their samples, label them, `cloud-bridge samples labels import`"
                )
            loop_id = await LoopStore(registry).create(NewLoop(args.fleet, tuple(devices), name, version, options))
            if args.wait:
                driver = _worker(config, registry).driver
                try:
                    await driver.run_until_settled()
                finally:
                    await driver.store.release(driver.owner)
                loop = await LoopStore(registry).get(loop_id)
                assert loop is not None
                return f"loop {loop_id}: {_summary(loop)}"
        return f"loop {loop_id} started for {', '.join(devices)}: `cloud-bridge improve run` drives it"

    print(asyncio.run(run()))
    return 0


def _summary(loop: dict[str, Any]) -> str:
    text = f"{loop['state']} (phase {loop['phase']})"
    gate = loop.get("gate")
    if gate:
        text += (
            f"; gate {'passed' if gate['passed'] else 'FAILED'}: drifted holdout {gate['drifted_current']:.3f} -> "
            f"{gate['drifted_candidate']:.3f} (n={gate['holdout_size']}), original test {gate['original_current']:.3f}"
            f" -> {gate['original_candidate']:.3f}"
        )
        esc = gate.get("escalation")
        if esc:
            said = {"does_not_help": "cloud no better: escalations paused", "helps": "cloud helps", "unknown": "?"}
            text += (
                f"; escalation on {esc['slice']} holdout (n={esc['labeled']}): candidate {esc['edge_accuracy']:.3f},"
                f" cloud {esc['cloud_accuracy']:.3f}, {said.get(esc['verdict'], esc['verdict'])}"
            )
    if loop.get("reason") and loop["state"] != "running":
        text += f"; {loop['reason']}"
    return text


def _status(args: argparse.Namespace) -> int:
    config = load_config(args.config)

    async def run() -> list[dict[str, Any]]:
        async with open_registry(config, create=False) as registry:
            store = LoopStore(registry)
            if args.loop is None:
                return await store.all()
            loop = await store.find(args.loop)
            if loop["candidate_version"]:
                lineage = await get_lineage(registry, loop["base_name"], loop["candidate_version"])
                loop["lineage"] = None if lineage is None else lineage.__dict__
            if loop["dataset_id"]:
                loop["dataset_counts"] = await dataset_counts(registry, loop["dataset_id"])
            return [loop]

    loops = asyncio.run(run())
    if args.json:
        print(json.dumps(loops, default=str, indent=1))
        return 0
    if args.loop is not None:
        loop = loops[0]
        for key in (
            "id",
            "fleet_id",
            "devices",
            "base_name",
            "base_version",
            "state",
            "phase",
            "dataset_id",
            "candidate_version",
            "rollout_id",
            "reason",
        ):
            print(f"{key:18} {loop[key]}")
        print(f"{'dataset':18} {json.dumps(loop.get('dataset_counts'))}")
        print(f"{'gate':18} {json.dumps(loop['gate'])}")
        print(f"{'lineage':18} {json.dumps(loop.get('lineage'), default=str)}")
        for entry in loop["history"]:
            print(f"  {time.strftime('%H:%M:%S', time.gmtime(entry['at']))}  {entry['event']}")
        return 0
    rows = [["loop", "fleet", "base", "state", "phase", "candidate", "summary"]]
    for loop in loops:
        rows.append(
            [
                loop["id"][:8],
                loop["fleet_id"],
                f"{loop['base_name']}@{loop['base_version']}",
                loop["state"],
                loop["phase"],
                loop["candidate_version"] or "-",
                _summary(loop),
            ]
        )
    if len(rows) == 1:
        print("no improvement loops: start one with `cloud-bridge improve start`")
    else:
        print_table(rows)
    return 0


def _abort(args: argparse.Namespace) -> int:
    config = load_config(args.config)

    async def run() -> str:
        async with open_registry(config, create=False) as registry:
            store = LoopStore(registry)
            loop = await store.find(args.loop)
            if not await store.abort(loop["id"], "aborted by `cloud-bridge improve abort`"):
                return f"loop {loop['id']} is {loop['state']}, not running: nothing to abort"
            return f"loop {loop['id']} aborted"

    print(asyncio.run(run()))
    return 0


def _escalation(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    name, version = _ref(args.cloud, "--cloud")

    async def run() -> list[EscalationValue]:
        async with open_registry(config, create=args.apply is not None) as registry:
            cloud = await ModelStore(config.model_store_dir, registry).get(name, version)
            found = await assess(registry, cloud.path, min_samples=args.min_samples, min_gain=args.min_gain)
            if args.apply is not None:
                paused = await record_advice(registry, found, args.apply)
                print(f"advice stored: {paused} device/version pair(s) told to pause escalations {args.apply:g} s")
            return found

    if args.apply is not None and not 0 < args.apply <= 86400:
        raise UsageError(f"--apply {args.apply}: a pause of 1 s to 86400 s (what escalate_reply/1 allows)")
    values = asyncio.run(run())
    if not values:
        print("no human-labeled samples yet: import labels with `cloud-bridge samples labels import FILE`")
        return 0
    rows = [["fleet", "device", "edge version", "labeled", "edge acc", "cloud acc", "escalation"]]
    for v in values:
        rows.append(
            [
                v.fleet_id,
                v.device_id,
                v.model_version,
                str(v.labeled),
                f"{v.edge_accuracy:.3f}",
                f"{v.cloud_accuracy:.3f}",
                v.verdict,
            ]
        )
    print_table(rows)
    return 0


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.tick_s is not None and args.tick_s <= 0:
        raise UsageError(f"--tick-s {args.tick_s} must be > 0")
    if args.cooldown_s is not None and args.cooldown_s < 0:
        raise UsageError(f"--cooldown-s {args.cooldown_s} must be >= 0")
    if args.min_human is not None and args.min_human < 1:
        raise UsageError(f"--min-human {args.min_human} must be at least 1")
    if args.tick_s is not None and config.improve.lease_s <= 2 * args.tick_s:
        raise UsageError(f"--tick-s {args.tick_s}: [improve] lease_s = {config.improve.lease_s} must exceed 2 x it")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        tsdb = _tsdb(config)
        async with open_registry(config) as registry, asyncio.TaskGroup() as group:
            if tsdb is not None:
                group.create_task(tsdb.run())
            worker = _worker(
                config,
                registry,
                tsdb,
                auto=True if args.auto else None,
                fleets=tuple(args.fleet) if args.fleet else None,
                min_human=args.min_human,
                cooldown_s=args.cooldown_s,
                tick_s=args.tick_s,
            )
            try:
                await worker.run(stop, once=args.once)
            finally:
                if tsdb is not None:
                    await tsdb.flush(10.0)
                    await tsdb.close()

    asyncio.run(run())
    return 0
