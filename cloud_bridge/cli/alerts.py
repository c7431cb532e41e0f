"""`cloud-bridge alerts`: drift and latency alerts as the registry has them, firing first.

An alert is a series of alert/1 messages with one `alert_id` (firing, then resolved); its state is
that of its latest message. One SQL statement picks each alert's latest message (grouped by
alert_id) among those of the last `--since`, plus every alert still firing whatever its age.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any, cast

from sqlalchemy import Table, and_, func, or_, select

from cloud_bridge.cli.common import Commands, add_config, command, open_registry, parse_when, print_table
from cloud_bridge.config import load_config
from cloud_bridge.registry import AlertRow, Registry


def add_subparsers(sub: Commands) -> None:
    parser = sub.add_parser(
        "alerts",
        help="list alerts: every one still firing, and those of the last --since",
        description="One line per alert (drift or latency, per device and model version): its state (firing or "
        "resolved, from its latest message), kind, device, model version, score against threshold, when it "
        "last changed and what the detector said. Firing alerts are listed whatever their age.",
    )
    add_config(parser, "state_dir, [registry]")
    parser.add_argument("--since", default="24h", help="also resolved alerts that changed since (default 24h)")
    parser.add_argument("--fleet", default=None, help="only this fleet id")
    parser.add_argument("--firing", action="store_true", help="only alerts firing now")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    command(parser, "alerts", _alerts)


def _alerts(args: argparse.Namespace) -> int:
    now = time.time()
    since = parse_when(args.since, now)
    config = load_config(args.config)

    async def rows() -> list[dict[str, Any]]:
        async with open_registry(config, create=False) as registry:
            return await recent_alerts(registry, since, fleet=args.fleet, firing_only=args.firing)

    alerts = asyncio.run(rows())
    if args.json:
        print(json.dumps(alerts, indent=2))
        return 0
    header = ("STATE", "KIND", "FLEET", "DEVICE", "MODEL", "SCORE", "THRESHOLD", "CHANGED", "DETAIL")
    print_table(
        [
            header,
            *(
                (
                    a["state"],
                    a["kind"],
                    a["fleet_id"],
                    a["device_id"],
                    a["model_version"],
                    f"{a['score']:.3g}",
                    f"{a['threshold']:.3g}",
                    time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(a["ts"])),
                    a["detail"][:80],
                )
                for a in alerts
            ),
        ]
    )
    return 0


async def recent_alerts(
    registry: Registry, since: float, *, fleet: str | None = None, firing_only: bool = False
) -> list[dict[str, Any]]:
    """Each alert's latest message: firing ones first, then by time, newest first."""
    a = cast(Table, AlertRow.__table__)
    latest = select(a.c.alert_id, func.max(a.c.ts).label("ts")).group_by(a.c.alert_id)
    if fleet is not None:
        latest = latest.where(a.c.fleet_id == fleet)
    last = latest.subquery()
    query = (
        select(a)
        .join(last, and_(a.c.alert_id == last.c.alert_id, a.c.ts == last.c.ts))
        .where(a.c.state == "firing" if firing_only else or_(a.c.state == "firing", a.c.ts >= since))
        .order_by((a.c.state == "firing").desc(), a.c.ts.desc())
    )
    async with registry.engine.connect() as conn:
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for row in await conn.execute(query):
            if row.alert_id in seen:
                continue  # two messages of one alert at the same instant: keep one
            seen.add(row.alert_id)
            out.append({k: v for k, v in row._mapping.items() if k != "msg_id"})
    return out
