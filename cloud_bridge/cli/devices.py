"""`cloud-bridge devices`: the fleet as the registry sees it, one line per device.

Online state, model and last-seen time come from the `devices` table; outbox depth and rates from
the device's telemetry windows of the last `--recent` seconds. One SQL statement does the work (after
one that asks whether the range holds rows stored before the summary columns): sums per device over
the recent windows (from the covering index ix_telemetry_stats, never the rows' bodies:
registry/telemetry_stats.py), the latest window's depth by one index seek per device, joined to the
devices. Measured at 10,000 devices (300,000 recent windows) in docs/scaling.md "Query times".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any, cast

from sqlalchemy import Table, and_, func, select

from cloud_bridge.cli.common import Commands, add_config, command, open_registry, print_table
from cloud_bridge.config import load_config
from cloud_bridge.errors import UsageError
from cloud_bridge.registry import Device, Registry
from cloud_bridge.registry.telemetry_stats import TELEMETRY, has_old_rows, stat, windows


def add_subparsers(sub: Commands) -> None:
    parser = sub.add_parser(
        "devices",
        help="list the fleet's devices: online, model, last seen, outbox depth, recent rates",
        description="One line per device known to the registry: online or offline (from its status messages), "
        "the model it runs, when it was last heard from, and from its telemetry of the last --recent seconds: "
        "outbox depth (latest window), inputs/s and escalations/s.",
    )
    add_config(parser, "state_dir, [registry]")
    parser.add_argument("--fleet", default=None, help="only this fleet id")
    state = parser.add_mutually_exclusive_group()
    state.add_argument("--online", action="store_true", help="only devices online now")
    state.add_argument("--offline", action="store_true", help="only devices offline now")
    parser.add_argument("--recent", type=float, default=300.0, help="seconds of telemetry for the rates (300)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    command(parser, "devices", _devices)


def _devices(args: argparse.Namespace) -> int:
    if args.recent <= 0:
        raise UsageError(f"--recent {args.recent} must be a positive number of seconds")
    config = load_config(args.config)
    online = True if args.online else False if args.offline else None

    async def rows() -> list[dict[str, Any]]:
        async with open_registry(config, create=False) as registry:
            return await fleet_devices(registry, time.time(), args.recent, fleet=args.fleet, online=online)

    devices = asyncio.run(rows())
    if args.json:
        print(json.dumps(devices, indent=2))
    else:
        print_table([_HEADER, *(_row(d, time.time()) for d in devices)])
    return 0


async def fleet_devices(
    registry: Registry, now: float, recent_s: float, *, fleet: str | None = None, online: bool | None = None
) -> list[dict[str, Any]]:
    """Every device (of `fleet`; online or not) with its telemetry rates over the last `recent_s`."""
    d = cast(Table, Device.__table__)
    since = now - recent_s
    async with registry.engine.connect() as conn:
        # Sums per device in SQL over the recent windows: from the covering index alone, unless the
        # range still holds rows stored before the summary columns (telemetry_stats.windows).
        w = windows(since, fleet, old_rows=await has_old_rows(conn, since, fleet))
        totals = select(
            w.c.fleet_id,
            w.c.device_id,
            func.sum(w.c.count).label("inputs"),
            func.sum(w.c.escalations_sent).label("escalated"),
            func.sum(w.c.window_end - w.c.window_start).label("span"),
            func.max(w.c.window_end).label("last"),
        )
        recent = totals.group_by(w.c.fleet_id, w.c.device_id).subquery()
        # The latest window's outbox depth: one index seek per device (window_end, fleet_id, device_id
        # lead ix_telemetry_stats), not a sort of every recent window by device and time.
        latest = TELEMETRY.alias("latest")
        depth = (
            select(stat("outbox_depth", latest))
            .where(
                latest.c.window_end == recent.c.last,
                latest.c.fleet_id == recent.c.fleet_id,
                latest.c.device_id == recent.c.device_id,
            )
            .limit(1)
            .scalar_subquery()
        )
        query = (
            select(
                d.c.fleet_id,
                d.c.device_id,
                d.c.online,
                d.c.last_seen,
                d.c.model_name,
                d.c.model_version,
                recent.c.inputs,
                recent.c.escalated,
                recent.c.span,
                depth.label("outbox_depth"),
            )
            .select_from(d)
            .outerjoin(recent, and_(recent.c.fleet_id == d.c.fleet_id, recent.c.device_id == d.c.device_id))
            .order_by(d.c.fleet_id, d.c.device_id)
        )
        if fleet is not None:
            query = query.where(d.c.fleet_id == fleet)
        if online is not None:
            query = query.where(d.c.online.is_(online))
        result = await conn.execute(query)
        out: list[dict[str, Any]] = []
        for r in result:
            span = float(r.span or 0.0)
            out.append(
                {
                    "fleet_id": r.fleet_id,
                    "device_id": r.device_id,
                    "online": bool(r.online),
                    "last_seen": float(r.last_seen or 0.0) or None,
                    "model_name": r.model_name,
                    "model_version": r.model_version,
                    "outbox_depth": None if r.outbox_depth is None else int(r.outbox_depth),
                    "inputs_per_s": round(float(r.inputs) / span, 3) if span > 0 else None,
                    "escalations_per_s": round(float(r.escalated or 0) / span, 3) if span > 0 else None,
                }
            )
    return out


_HEADER = ("FLEET", "DEVICE", "STATE", "MODEL", "LAST SEEN", "OUTBOX", "IN/S", "ESC/S")


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    age = max(0.0, now - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if age >= size:
            return f"{age / size:.0f}{unit} ago"
    return f"{age:.0f}s ago"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _row(d: dict[str, Any], now: float) -> tuple[str, ...]:
    model = f"{d['model_name']} {d['model_version']}" if d["model_name"] else "-"
    return (
        d["fleet_id"],
        d["device_id"],
        "online" if d["online"] else "offline",
        model,
        _ago(d["last_seen"], now),
        "-" if d["outbox_depth"] is None else str(d["outbox_depth"]),
        _rate(d["inputs_per_s"]),
        _rate(d["escalations_per_s"]),
    )
