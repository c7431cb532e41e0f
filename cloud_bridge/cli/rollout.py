"""`cloud-bridge rollout start|status|abort`: operate canary rollouts (cloud_bridge/rollout/driver.py).

The CLI talks to the registry database only: `start` inserts a rollout row that the running bridge
(whichever holds its lease) picks up on its next tick; `abort` marks it aborted and, with
`--rollback`, asks the bridge to send rollback commands to the devices that took it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cloud_bridge.cli.common import Commands, add_config, command, open_registry, print_table
from cloud_bridge.config import BridgeConfig, load_config
from cloud_bridge.errors import RolloutError, UsageError
from cloud_bridge.models.store import ModelStore
from cloud_bridge.ota.commands import command_states
from cloud_bridge.registry import Registry
from cloud_bridge.rollout.policy import THRESHOLD_NAMES, parse_thresholds
from cloud_bridge.rollout.stages import parse_stages, stage_label, stages_text, threshold_key
from cloud_bridge.rollout.store import CONTROLS, NewRollout, RolloutStore

_THRESHOLDS_HELP = (
    "override a threshold for every stage (name=value) or for one stage (PCT:name=value, PCT a value of "
    "--stages); repeatable or comma-separated. Names: " + ", ".join(THRESHOLD_NAMES)
)


def add_subparsers(sub: Commands) -> None:
    rollout = sub.add_parser(
        "rollout",
        help="canary rollouts of a model version across a fleet, gated by telemetry",
        description=(
            "Stage by stage (e.g. 5%, 25%, 100% of the fleet, devices picked by hash of rollout id + device "
            "id, offline ones skipped), the running bridge sends signed model updates, waits for every "
            "device to install, then compares the canary's telemetry with the rest of the fleet over a "
            "window: escalation rate, edge/cloud agreement, confidence, rejection rate, latency p95, and "
            "install failures. It promotes when the window passes and rolls every device back when a "
            "threshold is crossed, recording why. Defaults come from [rollout] in the bridge config."
        ),
    )
    rsub = rollout.add_subparsers(dest="rollout_command", required=True)
    start = rsub.add_parser("start", help="start a rollout (the running bridge drives it)")
    start.add_argument("--model", required=True, help="registered model name (`cloud-bridge models list`)")
    start.add_argument("--version", required=True, help="registered model version to roll out")
    start.add_argument(
        "--stages",
        default="5,25,100",
        help="cumulative fleet percentages (default 5,25,100), optionally led by a shadow stage: shadow:100,25,100",
    )
    start.add_argument("--fleet", default=None, help="fleet id (default: the only fleet the registry knows)")
    start.add_argument("--window-s", type=float, default=None, help="watch window per stage ([rollout] window_s)")
    start.add_argument("--thresholds", action="append", default=[], help=_THRESHOLDS_HELP)
    start.add_argument(
        "--control",
        choices=CONTROLS,
        default="fleet",
        help="judge the canary against every device on another model (fleet, the default), or against the "
        "canary devices' own telemetry before they switched (devices: for a model made for some devices only)",
    )
    add_config(start, "state_dir, [registry], [ota], [rollout]")
    command(start, "rollout start", _run(_start))
    status = rsub.add_parser("status", help="list rollouts, or show one with its devices and last evaluation")
    status.add_argument("id", nargs="?", default=None, help="rollout id (default: list all)")
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_config(status, "state_dir, [registry]")
    command(status, "rollout status", _run(_status, create=False))
    abort = rsub.add_parser("abort", help="stop a running rollout where it is")
    abort.add_argument("id", help="rollout id")
    abort.add_argument("--rollback", action="store_true", help="also roll back every device that took it")
    abort.add_argument("--reason", default="aborted by operator", help="recorded as the rollout's reason")
    add_config(abort, "state_dir, [registry]")
    command(abort, "rollout abort", _run(_abort))


Action = Callable[[argparse.Namespace, BridgeConfig, Registry], Awaitable[int]]


def _run(action: Action, *, create: bool = True) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        return asyncio.run(_with_registry(args, action, create))

    return handler


async def _with_registry(args: argparse.Namespace, action: Action, create: bool) -> int:
    config = load_config(args.config)
    async with open_registry(config, create=create) as registry:
        return await action(args, config, registry)


async def _start(args: argparse.Namespace, config: BridgeConfig, registry: Registry) -> int:
    stages = parse_stages(args.stages)
    overrides = parse_thresholds(args.thresholds)
    unknown = sorted(k for k in overrides if k != "*" and k not in {threshold_key(s) for s in stages})
    if unknown:
        raise UsageError(f"--thresholds name stages {', '.join(unknown)} that are not in --stages {args.stages}")
    window_s = config.rollout.window_s if args.window_s is None else args.window_s
    if window_s <= 0:
        raise UsageError(f"--window-s {window_s} must be greater than 0")
    record = await ModelStore(config.model_store_dir, registry).get(args.model, args.version)
    store = RolloutStore(registry)
    fleet_id = args.fleet or await _only_fleet(store)
    rollout_id = await store.create(NewRollout(fleet_id, record, stages, window_s, overrides, args.control))
    print(rollout_id)
    print(
        f"started rollout of {record.name} {record.version} (sha256 {record.sha256[:12]}) to fleet {fleet_id}: "
        f"stages {stages_text(stages)}%, window {window_s:g}s, control {args.control}; the running bridge drives it "
        f"(`cloud-bridge rollout status {rollout_id}`)",
        file=sys.stderr,
    )
    return 0


async def _only_fleet(store: RolloutStore) -> str:
    fleets = await store.fleets()
    if len(fleets) != 1:
        known = ", ".join(fleets) or "none yet (no device has reported)"
        raise UsageError(f"pass --fleet: the registry knows fleets {known}")
    return fleets[0]


async def _status(args: argparse.Namespace, config: BridgeConfig, registry: Registry) -> int:
    store = RolloutStore(registry)
    if args.id is None:
        rollouts = await store.all()
        if args.json:
            print(json.dumps(rollouts, indent=2, default=str))
        else:
            print_table(_summary_rows(rollouts))
        return 0
    rollout = await store.get(args.id)
    if rollout is None:
        raise RolloutError(f"no rollout {args.id}: list them with `cloud-bridge rollout status`")
    devices = await _devices_with_acks(store, registry, args.id)
    if args.json:
        print(json.dumps({**rollout, "devices": devices}, indent=2, default=str))
        return 0
    _print_detail(rollout, devices)
    return 0


async def _devices_with_acks(store: RolloutStore, registry: Registry, rollout_id: str) -> list[dict[str, Any]]:
    acks = {s.cmd_id: s for s in await command_states(registry, rollout_id=rollout_id)}
    out = []
    for row in await store.devices(rollout_id):
        rollback = acks.get(row["rollback_cmd_id"] or "")
        out.append({**row, "rollback_state": None if rollback is None else (rollback.state or "sent")})
    return out


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def _summary_rows(rollouts: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("ID", "FLEET", "MODEL", "STAGES", "STAGE", "STATE", "PHASE", "UPDATED", "REASON")]
    for r in rollouts:
        stages = r["stages"]
        rows.append(
            (
                r["id"],
                r["fleet_id"],
                f"{r['model_name']} {r['model_version']}",
                stages_text(stages),
                stage_label(stages[min(r["stage"], len(stages) - 1)]),
                r["state"],
                r["phase"],
                _when(r["updated_at"]),
                (r["reason"] or "")[:80],
            )
        )
    return rows


def _print_detail(rollout: dict[str, Any], devices: list[dict[str, Any]]) -> None:
    print_table(_summary_rows([rollout]))
    print(f"\nreason: {rollout['reason'] or '-'}")
    control = rollout.get("control") or "fleet"
    said = "the canary devices' own telemetry before they switched" if control == "devices" else "the rest of the fleet"
    print(f"control: {control} ({said})")
    evaluation = rollout.get("last_eval") or {}
    if evaluation:
        print(f"last evaluation ({_when(evaluation.get('at'))}): {evaluation['verdict']}: {evaluation['reason']}")
        for check in evaluation.get("checks", []):
            verdict = {True: "ok", False: "FAIL", None: "n/a"}[check["passed"]]
            canary, control = _num(check["canary"]), _num(check["control"])
            print(f"  {check['metric']:<18} canary {canary:<10} control {control:<10} {check['limit']}  {verdict}")
    print()
    rows: list[tuple[str, ...]] = [("DEVICE", "STAGE", "PREVIOUS", "STATE", "ROLLBACK", "REASON")]
    for d in devices:
        rows.append(
            (
                d["device_id"],
                stage_label(rollout["stages"][d["stage"]]),
                f"{d['previous_name'] or '-'} {d['previous_version'] or ''}".strip(),
                d["state"],
                d["rollback_state"] or "-",
                (d["reason"] or "")[:60],
            )
        )
    print_table(rows)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


async def _abort(args: argparse.Namespace, config: BridgeConfig, registry: Registry) -> int:
    store = RolloutStore(registry)
    rollout = await store.get(args.id)
    if rollout is None:
        raise RolloutError(f"no rollout {args.id}: list them with `cloud-bridge rollout status`")
    if not await store.abort(args.id, args.reason, args.rollback):
        raise RolloutError(f"rollout {args.id} is {rollout['state']}, not running: nothing to abort")
    then = "; the bridge sends rollback commands on its next tick" if args.rollback else ""
    print(f"rollout {args.id} aborted at stage {rollout['stages'][rollout['stage']]}%{then}")
    return 0
