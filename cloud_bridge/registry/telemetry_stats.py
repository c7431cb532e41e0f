"""Telemetry windows as rows of numbers, for queries that sum them over a fleet in SQL.

Rows stored since the summary columns exist (TelemetryRow: rejected, escalations_*, confidence_mean,
latency_p95_ms, outbox_depth) have them as columns, and the covering index `ix_telemetry_stats`
(tables.py) holds every column these queries read: SQLite answers from the index alone, never reading
a row's ~3 KB body. Older rows have NULL there and the same numbers in their `summary` JSON, or only in
their whole `body` when older still.

`windows()` is the windows of a time range with their numbers. When the range holds no older row
(`has_old_rows`: every range from one window length after an upgrade on) it is the columns alone.
Otherwise it is that UNION ALL the older rows with their numbers read from JSON, evaluated in the
branch: an aggregate over a table's columns makes SQLite copy every column it names into its GROUP BY
sorter, and naming `body` there (in a CASE for the older rows) copied 3 KB per window for all of
them: 108 s for `devices` at 10,000 devices instead of 0.3 s. `stat()` is the same choice per row,
for lookups of single windows (no sorter: SQLite reads the row only when the JSON branch is taken).

The JSON reading keeps what the Python aggregation of bodies did (cloud_bridge/rollout/policy.py
`aggregate`, cloud_bridge/drift/windows.py `own_latency`): counts the wire omits (zero) are 0, the
latency is the edge's own p95 where the device sent it, else that of every answer.
"""

from __future__ import annotations

from typing import Any, Literal, cast, get_args

from sqlalchemy import JSON, FromClause, Subquery, Table, case, func, literal, select, type_coerce, union_all
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from cloud_bridge.registry.tables import TelemetryRow

Stat = Literal[
    "rejected",
    "escalations_sent",
    "escalations_answered",
    "escalations_agreed",
    "confidence_mean",
    "latency_p95_ms",
    "outbox_depth",
]
STATS: tuple[Stat, ...] = get_args(Stat)

TELEMETRY = cast(Table, TelemetryRow.__table__)
# The columns of `windows()` besides the numbers.
KEYS = ("fleet_id", "device_id", "model_name", "model_version", "window_start", "window_end", "count")

# Where each number is in a summary or body: (JSON paths, first found; value when absent; SQL type).
_INT, _FLOAT = "int", "float"
_PATHS: dict[str, tuple[tuple[tuple[str, ...], ...], int | None, str]] = {
    "rejected": ((("rejected",),), 0, _INT),
    "escalations_sent": ((("escalations", "sent"),), 0, _INT),
    "escalations_answered": ((("escalations", "answered"),), 0, _INT),
    "escalations_agreed": ((("escalations", "agreed"),), 0, _INT),
    "confidence_mean": ((("confidence", "mean"),), None, _FLOAT),
    "latency_p95_ms": ((("edge_latency_ms", "p95"), ("latency_ms", "p95")), None, _FLOAT),
    "outbox_depth": ((("outbox", "depth"),), 0, _INT),
}


def is_old(t: FromClause = TELEMETRY) -> ColumnElement[bool]:
    """The row was stored before the summary columns (every new row has escalations_sent)."""
    return t.c.escalations_sent.is_(None)


def from_json(name: Stat, t: FromClause = TELEMETRY) -> ColumnElement[Any]:
    """A number of an older row, from its summary, else its body."""
    paths, absent, kind = _PATHS[name]
    doc = type_coerce(func.coalesce(t.c.summary, t.c.body), JSON)
    values: list[Any] = [doc[path].as_integer() if kind == _INT else doc[path].as_float() for path in paths]
    if absent is not None:
        values.append(literal(absent))
    return values[0] if len(values) == 1 else func.coalesce(*values)


def stat(name: Stat, t: FromClause = TELEMETRY) -> ColumnElement[Any]:
    """One window's number: its column, or for a row stored before the columns, its JSON field."""
    return case((is_old(t), from_json(name, t)), else_=t.c[name])


async def has_old_rows(conn: AsyncConnection, since: float, fleet_id: str | None = None) -> bool:
    """Whether windows ending at or after `since` include rows stored before the summary columns."""
    t = TELEMETRY
    query = select(t.c.window_end).where(t.c.window_end >= since, is_old(t))
    if fleet_id is not None:
        query = query.where(t.c.fleet_id == fleet_id)
    return (await conn.execute(query.limit(1))).first() is not None


def windows(since: float, fleet_id: str | None, *, old_rows: bool) -> Subquery:
    """The windows ending at or after `since` (of `fleet_id`, or all), as KEYS and STATS columns.
    `old_rows`: the range may hold rows stored before the columns (has_old_rows said so)."""
    t = TELEMETRY
    keys = [t.c[k] for k in KEYS]
    where = [t.c.window_end >= since] if fleet_id is None else [t.c.window_end >= since, t.c.fleet_id == fleet_id]
    new = select(*keys, *(t.c[s] for s in STATS)).where(*where, ~is_old(t))
    if not old_rows:
        return new.subquery("windows")
    old = select(*keys, *(from_json(s).label(s) for s in STATS)).where(*where, is_old(t))
    return union_all(new, old).subquery("windows")
