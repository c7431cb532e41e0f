"""The numbers of a telemetry window as SQL expressions, for queries that sum them over a fleet.

Rows stored since the summary columns exist (TelemetryRow: rejected, escalations_*, confidence_mean,
latency_p95_ms, outbox_depth) have them as columns; older rows have NULL there and the same numbers in
their `summary` JSON, or only in their whole `body` when older still. `stat(name)` is the column where
the row has it, else the JSON field, so a query sums every window in SQL whatever release stored it.
Both engines evaluate the JSON branch only for the rows that need it, and SQLite reads a table row
only then: the covering index `ix_telemetry_stats` (tables.py) holds everything else.

The JSON branch keeps what the Python aggregation of bodies did (cloud_bridge/rollout/policy.py
`aggregate`, cloud_bridge/drift/windows.py `own_latency`): counts the wire omits (zero) are 0, the
latency is the edge's own p95 where the device sent it, else that of every answer.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from sqlalchemy import JSON, FromClause, Table, case, func, type_coerce
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

TELEMETRY = cast(Table, TelemetryRow.__table__)

# Where each number is in a summary or body: (JSON path, value when absent, SQL type).
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


def _from_json(t: FromClause, name: str) -> ColumnElement[Any]:
    paths, absent, kind = _PATHS[name]
    doc = type_coerce(func.coalesce(t.c.summary, t.c.body), JSON)
    values = [doc[path].as_integer() if kind == _INT else doc[path].as_float() for path in paths]
    if absent is not None:
        values.append(absent)
    return values[0] if len(values) == 1 else func.coalesce(*values)


def stat(name: Stat, t: FromClause = TELEMETRY) -> ColumnElement[Any]:
    """A window's number: its column, or for a row stored before the columns, its summary or body field."""
    return case((is_old(t), _from_json(t, name)), else_=t.c[name])
