"""The bridge's registry: SQLAlchemy 2 async, SQLite (WAL, via aiosqlite) by default, PostgreSQL by URL.

Tables are declared with the ORM; the hot path writes with Core bulk statements (one executemany per
table per batch, one transaction per batch: group commit, docs/traps.md #4). Per-row ORM objects
would cost more Python time per message than the whole budget of the bridge.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

log = logging.getLogger(__name__)


class Base(DeclarativeBase):
    pass


class Device(Base):
    __tablename__ = "devices"
    fleet_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[float] = mapped_column(Float, default=0.0)
    model_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    messages: Mapped[int] = mapped_column(BigInteger, default=0)
    telemetry_windows: Mapped[int] = mapped_column(BigInteger, default=0)
    samples: Mapped[int] = mapped_column(BigInteger, default=0)
    results: Mapped[int] = mapped_column(BigInteger, default=0)
    # Status.order of the status that set `online` (None: none of the device's carried one yet).
    status_order: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class SeenMessage(Base):
    __tablename__ = "seen_messages"
    msg_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    received_at: Mapped[float] = mapped_column(Float, index=True)


class DeadLetter(Base):
    __tablename__ = "dead_letters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(1024))
    reason: Mapped[str] = mapped_column(String(2048))
    field: Mapped[str] = mapped_column(String(256))
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    raw_size: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[float] = mapped_column(Float)


class SampleRow(Base):
    __tablename__ = "samples"
    msg_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    fleet_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    inference_id: Mapped[str] = mapped_column(String(128))
    dtype: Mapped[str] = mapped_column(String(16))
    shape: Mapped[list[int]] = mapped_column(JSON)
    tensor: Mapped[bytes] = mapped_column(LargeBinary)
    topk: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    entropy: Mapped[float] = mapped_column(Float)
    margin: Mapped[float] = mapped_column(Float)
    reasons: Mapped[list[str]] = mapped_column(JSON)
    predicted: Mapped[str] = mapped_column(String(64))
    truth: Mapped[str | None] = mapped_column(String(64), nullable=True)
    ts: Mapped[float] = mapped_column(Float)
    # For labelers' exports (cloud_bridge/samples/cli.py): which exact model answered, where the input
    # came from, and when the bridge archived it (the export cursor and the archive's age bound use
    # arrival time, so a device that was offline for hours is not skipped).
    model_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    source_ref: Mapped[str | None] = mapped_column(String(256), nullable=True)
    received_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)


class ResultRow(Base):
    """One final answer; a result/2 message carries many, so the key is the message and the place."""

    __tablename__ = "results"
    msg_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    fleet_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    inference_id: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(16))
    confidence: Mapped[float] = mapped_column(Float)
    truth: Mapped[str | None] = mapped_column(String(64), nullable=True)
    ts: Mapped[float] = mapped_column(Float)


class TelemetryRow(Base):
    __tablename__ = "telemetry"
    msg_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    fleet_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    window_start: Mapped[float] = mapped_column(Float)
    window_end: Mapped[float] = mapped_column(Float, index=True)
    count: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)


class CommandAckRow(Base):
    __tablename__ = "command_acks"
    msg_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    fleet_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(String(64))
    cmd_id: Mapped[str] = mapped_column(String(36), index=True)
    state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    ts: Mapped[float] = mapped_column(Float)


class AlertRow(Base):
    __tablename__ = "alerts"
    msg_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    fleet_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(String(64))
    alert_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    model_version: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    detail: Mapped[str] = mapped_column(String(1024))
    ts: Mapped[float] = mapped_column(Float)


class Agreement(Base):
    __tablename__ = "escalation_agreement"
    fleet_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    answered: Mapped[int] = mapped_column(BigInteger, default=0)
    agreed: Mapped[int] = mapped_column(BigInteger, default=0)


class ModelRow(Base):
    """A registered model artifact (cloud_bridge/models/store.py); the bytes live at `path`, named by sha256."""

    __tablename__ = "models"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(String(1024))
    labels: Mapped[list[str]] = mapped_column(JSON)
    input_shape: Mapped[list[int]] = mapped_column(JSON)
    reference_mix: Mapped[dict[str, float]] = mapped_column(JSON)
    added_at: Mapped[float] = mapped_column(Float)


class CommandRow(Base):
    """A signed command the cloud sent (cloud_bridge/ota/commands.py); join with command_acks on cmd_id."""

    __tablename__ = "commands"
    cmd_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    fleet_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(32))
    model_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    rollout_id: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    stage: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sent_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)


class RolloutRow(Base):
    """A canary rollout (cloud_bridge/rollout/driver.py); `owner`/`lease_until` let one bridge drive it at a time."""

    __tablename__ = "rollouts"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    fleet_id: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    model_sha256: Mapped[str] = mapped_column(String(64))
    stages: Mapped[list[int]] = mapped_column(JSON)
    stage: Mapped[int] = mapped_column(Integer, default=0)
    phase: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    thresholds: Mapped[dict[str, dict[str, float]]] = mapped_column(JSON)
    window_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    stage_started_at: Mapped[float] = mapped_column(Float)
    watch_from: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)
    rollback_pending: Mapped[bool] = mapped_column(Boolean, default=False)
    last_eval: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class RolloutDeviceRow(Base):
    """One device of a rollout: the stage that took it, what it ran before, its update and rollback."""

    __tablename__ = "rollout_devices"
    rollout_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    fleet_id: Mapped[str] = mapped_column(String(64))
    stage: Mapped[int] = mapped_column(Integer)
    previous_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    previous_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    previous_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cmd_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    rollback_cmd_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)


class DriftStateRow(Base):
    """All drift state of one (device, model version) in one row (cloud_bridge/drift/store.py): the
    baseline, the windows it is scored on, and each kind's hysteresis. It is also the row an evaluation
    locks, so one row read and one row write per device and batch."""

    __tablename__ = "drift_states"
    fleet_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_sha256: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))
    class_mix: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)
    class_samples: Mapped[int] = mapped_column(Integer, default=0)
    baseline: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON text of the pooled baseline
    # JSON text of the windows: every one so far until the baseline is frozen, then the newest few.
    windows: Mapped[str] = mapped_column(Text, default="[]")
    kinds: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    last_window_end: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class DriftEpisodeRow(Base):
    """One alert transition; the primary key is the dedup key: one firing and one resolved per episode."""

    __tablename__ = "drift_episodes"
    fleet_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    episode: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    alert_msg_id: Mapped[str] = mapped_column(String(36), unique=True)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    published: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    created_at: Mapped[float] = mapped_column(Float)


@dataclass
class DeviceDelta:
    """What one batch changes on one device row."""

    last_seen: float = 0.0
    messages: int = 0
    telemetry_windows: int = 0
    samples: int = 0
    results: int = 0
    # From status messages only (None: the batch has none for this device), which every bridge
    # receives in order; a device first heard of through telemetry starts online (_device_values).
    online: bool | None = None
    status_order: int | None = None  # Status.order of the status `online` comes from, if it had one
    model: tuple[str, str, str] | None = None


@dataclass
class Batch:
    """Everything one group commit writes."""

    seen: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    rows: dict[type[Base], list[dict[str, Any]]] = field(default_factory=dict)
    devices: dict[tuple[str, str], DeviceDelta] = field(default_factory=dict)
    # Run last inside the batch's transaction (drift scoring reads what the batch just wrote); a
    # retried commit runs them again, so they must reset whatever they produce.
    hooks: list[Callable[[Connection], None]] = field(default_factory=list)
    # Dedup inside the transaction: when set, `seen` is inserted first and the msg_ids it really
    # added (INSERT ... ON CONFLICT DO NOTHING RETURNING) are passed here, before anything else is
    # written, so the batch can keep only theirs (rows, device counters, hooks). Called on every
    # attempt: a retried commit may find a different set.
    narrow: Callable[[set[str]], None] | None = None

    def add_row(self, table: type[Base], row: dict[str, Any]) -> None:
        self.rows.setdefault(table, []).append(row)

    def device(self, fleet_id: str, device_id: str) -> DeviceDelta:
        key = (fleet_id, device_id)
        delta = self.devices.get(key)
        if delta is None:
            delta = self.devices[key] = DeviceDelta()
        return delta

    def __len__(self) -> int:
        return len(self.seen) + len(self.dead_letters)


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _json_loads(text: str | bytes) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        # Rows written by stdlib json before orjson may hold NaN/Infinity, which only it reads.
        return json.loads(text)


def _device_values(key: tuple[str, str], delta: DeviceDelta) -> dict[str, Any]:
    name, version, sha = delta.model if delta.model is not None else (None, None, None)
    return {
        "fleet_id": key[0],
        "device_id": key[1],
        "last_seen": delta.last_seen,
        "messages": delta.messages,
        "telemetry_windows": delta.telemetry_windows,
        "samples": delta.samples,
        "results": delta.results,
        "online": delta.online if delta.online is not None else delta.telemetry_windows > 0,
        "online_known": delta.online is not None,
        "status_order": delta.status_order,
        "model_name": name,
        "model_version": version,
        "model_sha256": sha,
    }


def _set_aside_old_results(conn: Connection) -> None:
    """A registry made before result/2 keyed `results` by msg_id alone, which cannot hold a message's
    many answers: rename it to results_v1 (kept, not dropped) so create_all makes the new table."""
    inspector = inspect(conn)
    if not inspector.has_table("results") or any(c["name"] == "seq" for c in inspector.get_columns("results")):
        return
    if inspector.has_table("results_v1"):
        raise RuntimeError(
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
_NEW_COLUMNS = (("devices", "status_order", "BIGINT"),)


def _add_new_columns(conn: Connection) -> None:
    """create_all makes missing tables, not missing columns: add those a registry made by an
    earlier version lacks (nullable, so existing rows need no value)."""
    inspector = inspect(conn)
    for table, column, sql_type in _NEW_COLUMNS:
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            log.warning("registry: adding column %s.%s", table, column)
            conn.execute(text(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {sql_type}'))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL + NORMAL: a commit survives a process crash; group commit makes the fsync cost per batch.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class Registry:
    """Async access to the registry database."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite"):
            db_path = url.split(":///", 1)[-1]
            if db_path and db_path != ":memory:":
                Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        # orjson for JSON columns: telemetry bodies, sample top-k and drift state are encoded on the
        # ingest hot path, where stdlib json cost ~6% of the bridge's time.
        self.engine: AsyncEngine = create_async_engine(url, json_serializer=_json_dumps, json_deserializer=_json_loads)
        self._dialect = self.engine.dialect.name
        self._device_stmt: Any = None
        # Per (table, columns): the INSERT statement and each column's bind processor (_insert_sqlite).
        self._sqlite_plans: dict[
            tuple[type[Base], tuple[str, ...]], tuple[str, list[tuple[int, Callable[[Any], Any]]]]
        ] = {}
        if self._dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)

    async def create(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(_set_aside_old_results)
            await conn.run_sync(Base.metadata.create_all)
            await conn.run_sync(_add_new_columns)

    async def close(self) -> None:
        await self.engine.dispose()

    def _insert(self, table: Any) -> Any:
        return (postgresql.insert if self._dialect == "postgresql" else sqlite.insert)(table)

    async def commit_batch(self, batch: Batch) -> None:
        """Write a whole batch in one transaction."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self._write_batch_sync, batch)

    def _write_batch_sync(self, conn: Connection, batch: Batch) -> None:
        # One run_sync for the whole batch; with aiosqlite each statement is still one hop to its thread,
        # so statements are per table (executemany), never per row or per device.
        if batch.seen:
            stmt = self._insert(SeenMessage).on_conflict_do_nothing()
            if batch.narrow is None:
                conn.execute(stmt, batch.seen)
            else:
                batch.narrow(set(conn.execute(stmt.returning(SeenMessage.msg_id), batch.seen).scalars()))
        if batch.dead_letters:
            conn.execute(insert(DeadLetter), batch.dead_letters)
        for table, rows in batch.rows.items():
            if self._dialect == "sqlite":
                self._insert_sqlite(conn, table, rows)
            else:
                conn.execute(self._insert(table).on_conflict_do_nothing(), rows)
        if batch.devices:
            conn.execute(self._device_upsert(), [_device_values(key, delta) for key, delta in batch.devices.items()])
        for hook in batch.hooks:
            hook(conn)

    def _insert_sqlite(self, conn: Connection, table: type[Base], rows: list[dict[str, Any]]) -> None:
        """INSERT ... ON CONFLICT DO NOTHING of many rows through the driver's executemany.

        SQLAlchemy's executemany spends ~3 µs per row building its parameters, more than SQLite
        takes to store the row (5.2 against 2.3 µs per result row): at 2-3 answers per result/2
        message that was a tenth of the bridge's CPU. Every row of one table in a batch comes from
        the same builder, so the first row's keys are the columns; values still pass through the
        columns' own bind processors (JSON, for one)."""
        columns = tuple(rows[0])
        plan = self._sqlite_plans.get((table, columns))
        if plan is None:
            t = cast(Table, table.__table__)
            names = ", ".join(f'"{c}"' for c in columns)
            sql = f'INSERT INTO "{t.name}" ({names}) VALUES ({", ".join("?" * len(columns))}) ON CONFLICT DO NOTHING'
            converts: list[tuple[int, Callable[[Any], Any]]] = []
            for i, c in enumerate(columns):
                processor = t.c[c].type.bind_processor(conn.dialect)
                if processor is not None:
                    converts.append((i, processor))
            plan = self._sqlite_plans[(table, columns)] = (sql, converts)
        sql, converts = plan
        params = [[row[c] for c in columns] for row in rows]
        for i, convert in converts:
            for values in params:
                values[i] = convert(values[i])
        conn.exec_driver_sql(sql, [tuple(values) for values in params])

    def _device_upsert(self) -> Any:
        """One statement for every device of a batch (executemany): counters add, last_seen takes the
        max, online and the model change only where the batch says something about them."""
        if self._device_stmt is None:
            table = Device.__table__
            stmt = self._insert(Device)
            new = stmt.excluded
            greatest = func.max if self._dialect == "sqlite" else func.greatest
            # Status messages of one device can be committed out of order (several bridges each
            # commit the copy they deduplicated first): the online state follows the status of
            # the highest order, and one without an order (older devices) as it comes.
            newer = or_(
                new.status_order.is_(None), table.c.status_order.is_(None), new.status_order >= table.c.status_order
            )
            self._device_stmt = stmt.on_conflict_do_update(
                index_elements=["fleet_id", "device_id"],
                set_={
                    "last_seen": greatest(table.c.last_seen, new.last_seen),
                    "messages": table.c.messages + new.messages,
                    "telemetry_windows": table.c.telemetry_windows + new.telemetry_windows,
                    "samples": table.c.samples + new.samples,
                    "results": table.c.results + new.results,
                    "online": case(
                        (and_(bindparam("online_known", type_=Boolean), newer), new.online), else_=table.c.online
                    ),
                    "status_order": case(
                        (new.status_order.is_(None), table.c.status_order),
                        (table.c.status_order.is_(None), new.status_order),
                        else_=greatest(table.c.status_order, new.status_order),
                    ),
                    "model_name": func.coalesce(new.model_name, table.c.model_name),
                    "model_version": func.coalesce(new.model_version, table.c.model_version),
                    "model_sha256": func.coalesce(new.model_sha256, table.c.model_sha256),
                },
            )
        return self._device_stmt

    async def add_agreement(self, counts: Iterable[tuple[tuple[str, str, str], tuple[int, int]]]) -> None:
        """Add (answered, agreed) escalation counts per (fleet, device, edge model version)."""
        async with self.engine.begin() as conn:
            for (fleet_id, device_id, version), (answered, agreed) in counts:
                table = Agreement.__table__
                stmt = self._insert(Agreement).values(
                    fleet_id=fleet_id, device_id=device_id, model_version=version, answered=answered, agreed=agreed
                )
                await conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["fleet_id", "device_id", "model_version"],
                        set_={"answered": table.c.answered + answered, "agreed": table.c.agreed + agreed},
                    )
                )

    async def prune_seen(self, before: float) -> int:
        """Forget msg_ids received before `before`: past the broker's redelivery window they cannot recur."""
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(SeenMessage).where(SeenMessage.received_at < before))
            return int(result.rowcount)

    async def count(self, table: type[Base]) -> int:
        async with self.engine.connect() as conn:
            result = await conn.execute(select(func.count()).select_from(table))
            return int(result.scalar_one())

    async def device_model(self, fleet_id: str, device_id: str) -> str | None:
        """The sha256 of the model the device last said it runs (None: unknown device or model)."""
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(Device.model_sha256).where(Device.fleet_id == fleet_id, Device.device_id == device_id)
            )
            return result.scalar_one_or_none()

    async def rows(self, table: type[Base]) -> list[dict[str, Any]]:
        """All rows of a table as dicts (for tests and operators; not for the hot path)."""
        async with self.engine.connect() as conn:
            return await _all_rows(conn, table)


async def _all_rows(conn: AsyncConnection, table: type[Base]) -> list[dict[str, Any]]:
    result = await conn.execute(select(table.__table__))
    return [dict(row._mapping) for row in result]
