"""Bringing a registry database up to date: the tables a release adds, and what it changed in old ones.

`create_all` makes missing tables but never changes an existing one, so a registry made by an earlier
version also gets its missing columns added and a table whose key changed set aside (renamed, never
dropped), keeping every row.
"""

from __future__ import annotations

import logging

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from cloud_bridge.errors import RegistryError
from cloud_bridge.registry.tables import Base

log = logging.getLogger(__name__)


def upgrade(conn: Connection) -> None:
    """Create what is missing and migrate what is old (idempotent: run at every start)."""
    _set_aside_old_results(conn)
    Base.metadata.create_all(conn)
    _add_new_columns(conn)
    _add_new_indexes(conn)


def _set_aside_old_results(conn: Connection) -> None:
    """A registry made before result/2 keyed `results` by msg_id alone, which cannot hold a message's
    many answers: rename it to results_v1 (kept, not dropped) so `create_all` makes the new table."""
    inspector = inspect(conn)
    if not inspector.has_table("results") or any(c["name"] == "seq" for c in inspector.get_columns("results")):
        return
    if inspector.has_table("results_v1"):
        raise RegistryError(
            "the registry's results table has the old layout and results_v1 already exists: "
            "rename or drop one of them, then start the bridge again"
        )
    log.warning("registry: renaming the old results table to results_v1 (one row per message before result/2)")
    # Index names are per schema, not per table: the old table's would collide with the new one's.
    pk = inspector.get_pk_constraint("results").get("name")
    for index in inspector.get_indexes("results"):
        conn.execute(text(f'DROP INDEX "{index["name"]}"'))
    conn.execute(text("ALTER TABLE results RENAME TO results_v1"))
    if conn.dialect.name == "postgresql" and pk:
        conn.execute(text(f'ALTER TABLE results_v1 RENAME CONSTRAINT "{pk}" TO "{pk}_v1"'))


# Columns added to existing tables since the registry was first released: (table, column, SQL type).
NEW_COLUMNS = (
    ("devices", "status_order", "BIGINT"),
    ("drift_states", "version", "BIGINT"),
    ("telemetry", "summary", "JSON"),
    # The summary's numbers as columns, summed in SQL (cloud_bridge/registry/telemetry_stats.py).
    ("telemetry", "rejected", "INTEGER"),
    ("telemetry", "escalations_sent", "INTEGER"),
    ("telemetry", "escalations_answered", "INTEGER"),
    ("telemetry", "escalations_agreed", "INTEGER"),
    ("telemetry", "confidence_mean", "FLOAT"),
    ("telemetry", "latency_p95_ms", "FLOAT"),
    ("telemetry", "outbox_depth", "INTEGER"),
    ("rollouts", "control", "VARCHAR(16)"),
)


def _add_new_columns(conn: Connection) -> None:
    """create_all makes missing tables, not missing columns: add those a registry made by an
    earlier version lacks (nullable, so existing rows need no value)."""
    inspector = inspect(conn)
    for table, column, sql_type in NEW_COLUMNS:
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            log.warning("registry: adding column %s.%s", table, column)
            conn.execute(text(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {sql_type}'))


# Indexes a release no longer declares because a newer one leads with the same columns: dropped once
# that one exists (each index costs every insert). (table, index)
SUPERSEDED_INDEXES = (("telemetry", "ix_telemetry_window_end"),)  # by ix_telemetry_stats


def _add_new_indexes(conn: Connection) -> None:
    """create_all makes a missing table's indexes, not those a release declares on an existing table
    (their columns may be new too, so this runs after _add_new_columns); then drop what they supersede."""
    inspector = inspect(conn)
    for table in Base.metadata.sorted_tables:
        known = {index["name"] for index in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in known:
                # Ingestion waits meanwhile: measured ~3 s per 600,000 telemetry rows on SQLite.
                log.warning(
                    "registry: creating index %s on %s (once: a large table takes a while)", index.name, table.name
                )
                index.create(conn)
    for table_name, name in SUPERSEDED_INDEXES:
        if name in {index["name"] for index in inspector.get_indexes(table_name)}:
            log.warning("registry: dropping index %s (superseded)", name)
            conn.execute(text(f'DROP INDEX "{name}"'))
