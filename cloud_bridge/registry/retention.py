"""Result rows bounded by retention, their per-bucket aggregates kept; telemetry rows bounded too.

Every answer a device sends becomes a `results` row: at 1 Hz that is 86,400 rows per device-day,
most of a registry's growth. Rows older than `[registry] results_retention_s` are folded into
`result_aggregates` (per fleet, device, edge model version, path and `results_bucket_s` bucket of
the answer's `ts`: answers, confidence sum, answers with a known truth and how many were right) and
deleted, in one transaction per slice of `results_bucket_s`, so ingestion waits at most one slice.

Age is the time in the row's msg_id (UUIDv7, the device's clock when it made the message): the primary
key (msg_id, seq) is the index the cut uses, so no extra index is written for every answer.

Telemetry rows whose window ended more than `[registry] telemetry_retention_s` ago are deleted, a
minute of windows per transaction (the `ix_telemetry_stats` index leads with window_end), so a first
prune of a registry that kept months of windows does not hold SQLite's write lock for minutes.

Several bridges may prune at once (PostgreSQL): there the rows are deleted and aggregated in one
statement (`WITH gone AS (DELETE ... RETURNING ...) INSERT ... ON CONFLICT DO UPDATE`), so a row
is counted by whichever transaction deleted it, never twice. On SQLite the INSERT ... SELECT takes
the database's write lock before it reads, and the DELETE follows in the same transaction.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import text

from cloud_bridge.config import RegistryConfig
from cloud_bridge.registry.registry import Registry

log = logging.getLogger(__name__)

_COLUMNS = (
    "fleet_id, device_id, model_version, path, bucket_start, bucket_s, answers, confidence_sum, with_truth, correct"
)
_UPSERT = """ON CONFLICT (fleet_id, device_id, model_version, path, bucket_start) DO UPDATE SET
  answers = result_aggregates.answers + excluded.answers,
  confidence_sum = result_aggregates.confidence_sum + excluded.confidence_sum,
  with_truth = result_aggregates.with_truth + excluded.with_truth,
  correct = result_aggregates.correct + excluded.correct"""
_AGGREGATE = """SELECT fleet_id, device_id, model_version, path, {bucket} AS b, :bucket_s, count(*),
  sum(confidence), count(truth), sum(CASE WHEN truth = label THEN 1 ELSE 0 END)
FROM {source} GROUP BY fleet_id, device_id, model_version, path, b"""

_SQLITE = [
    f"INSERT INTO result_aggregates ({_COLUMNS}) "
    + _AGGREGATE.format(
        bucket="CAST(ts / :bucket_s AS INTEGER) * :bucket_s", source="results WHERE msg_id >= :lo AND msg_id < :hi"
    )
    + " "
    + _UPSERT,
    "DELETE FROM results WHERE msg_id >= :lo AND msg_id < :hi",
]
_POSTGRES = [
    "WITH gone AS (DELETE FROM results WHERE msg_id >= :lo AND msg_id < :hi "
    "RETURNING fleet_id, device_id, model_version, path, ts, confidence, truth, label) "
    f"INSERT INTO result_aggregates ({_COLUMNS}) "
    + _AGGREGATE.format(bucket="floor(ts / :bucket_s) * :bucket_s", source="gone")
    + " "
    + _UPSERT
]


def id_at(t: float) -> str:
    """The smallest UUIDv7 msg_id made at unix time `t` or later (ids compare as strings in time order)."""
    h = f"{max(0, int(t * 1000)):012x}"
    return f"{h[:8]}-{h[8:12]}-0000-0000-000000000000"


def _time_of(msg_id: str) -> float:
    return int(msg_id[:8] + msg_id[9:13], 16) / 1000.0


async def _past_retention(
    registry: Registry, retention_s: float, now: float | None, oldest_sql: str
) -> tuple[float, Any] | None:
    """The cutoff time and the table's oldest key (`oldest_sql`), or None: retention off or no rows."""
    if retention_s <= 0:
        return None
    cutoff = (time.time() if now is None else now) - retention_s
    async with registry.engine.connect() as conn:
        oldest = (await conn.execute(text(oldest_sql))).scalar()
    return None if oldest is None else (cutoff, oldest)


async def prune_results(registry: Registry, retention_s: float, bucket_s: float, now: float | None = None) -> int:
    """Fold result rows older than `retention_s` into result_aggregates and delete them; returns the
    result rows deleted (SQLite) or the aggregate rows written (PostgreSQL), for the log."""
    found = await _past_retention(registry, retention_s, now, "SELECT min(msg_id) FROM results")
    if found is None:
        return 0
    cutoff, oldest = found
    statements = _POSTGRES if registry.engine.dialect.name == "postgresql" else _SQLITE
    done = 0
    lo = "0"
    start = _time_of(str(oldest))
    while start < cutoff:
        end = min(cutoff, (start // bucket_s + 1) * bucket_s)
        hi = id_at(end)
        params = {"lo": lo, "hi": hi, "bucket_s": bucket_s}
        async with registry.engine.begin() as conn:
            for sql in statements:
                result = await conn.execute(text(sql), params)
            done += max(0, int(result.rowcount))
        lo, start = hi, end
    if done:
        log.info("results folded into aggregates rows=%d older_than_s=%g bucket_s=%g", done, retention_s, bucket_s)
    return done


_TELEMETRY_SLICE_S = 60.0


async def prune_telemetry(registry: Registry, retention_s: float, now: float | None = None) -> int:
    """Delete telemetry rows whose window ended more than `retention_s` ago; returns how many."""
    found = await _past_retention(registry, retention_s, now, "SELECT min(window_end) FROM telemetry")
    if found is None:
        return 0
    cutoff, oldest = found
    done = 0
    start = float(oldest)
    while start < cutoff:
        end = min(cutoff, start + _TELEMETRY_SLICE_S)
        async with registry.engine.begin() as conn:
            result = await conn.execute(text("DELETE FROM telemetry WHERE window_end < :end"), {"end": end})
            done += max(0, int(result.rowcount))
        start = end
    if done:
        log.info("telemetry windows past retention deleted rows=%d older_than_s=%g", done, retention_s)
    return done


async def prune_registry(registry: Registry, config: RegistryConfig, now: float | None = None) -> None:
    """Everything `[registry]` bounds by age: result rows (folded into aggregates), telemetry rows."""
    await prune_results(registry, config.results_retention_s, config.results_bucket_s, now)
    await prune_telemetry(registry, config.telemetry_retention_s, now)
