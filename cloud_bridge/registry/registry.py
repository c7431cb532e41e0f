"""The bridge's registry: SQLAlchemy 2 async, SQLite (WAL, via aiosqlite) by default, PostgreSQL by URL.

Tables are declared with the ORM (cloud_bridge/registry/tables.py); the hot path writes with Core bulk
statements (one executemany per table per batch, one transaction per batch: group commit,
docs/traps.md #4). Per-row ORM objects would cost more Python time per message than the whole budget
of the bridge.

On a SQLite file the batches are written by a plain (sync) engine on a thread of their own, one hop
per batch: through aiosqlite every statement is a hop to its thread and back through the event loop,
and with the loop busy receiving thousands of messages a second each return waited its turn. At
10,000 simulated devices a batch of 1,000 messages (a dozen statements with drift's) spent 0.42 s
committing, ~80% of it waiting for the loop, and ingestion fell behind on the commits alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
from sqlalchemy import (
    Boolean,
    Table,
    and_,
    bindparam,
    case,
    delete,
    event,
    false,
    func,
    insert,
    or_,
    select,
    text,
    true,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, create_engine, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.compiler import SQLCompiler

from cloud_bridge.registry.bulk import (
    RESULT_COLUMNS,
    bound_values,
    insert_results_postgresql,
    insert_rows_sqlite,
    upsert_rows_sqlite,
)
from cloud_bridge.registry.migrations import upgrade
from cloud_bridge.registry.tables import Agreement, Base, DeadLetter, Device, SeenMessage

log = logging.getLogger(__name__)

_SCHEMA_LOCK = 0x65646765666C74  # PostgreSQL advisory lock key held while the schema is brought up to date


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
    # Result rows (one per answer: ~10 per result/2 message, the most rows by far) as tuples in
    # RESULT_COLUMNS order: a dict per row, then a list per row for the driver, cost more than
    # SQLite took to store them (a third of the commit's CPU at 10,000 devices).
    results: list[tuple[Any, ...]] = field(default_factory=list)
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
    # Feature statistics of the batch's telemetry windows by msg_id, for drift scoring inside the
    # transaction. The telemetry row's body leaves them out: drift_windows keeps them (packed, for the
    # windows drift pools), and as JSON they were ~2.4 of a body's ~3.1 KB, the registry's largest write.
    features: dict[str, dict[str, Any]] = field(default_factory=dict)

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


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL + NORMAL: a commit survives a process crash; group commit makes the fsync cost per batch.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


# Page cache of the batch writer, in KiB (negative: a size, not pages). SQLite's default is 2 MiB; the
# results and seen_messages keys are random (msg ids), so with a registry of hundreds of MB each
# insert touched index pages no longer cached. Allocated as used, on the writer's connection only.
WRITER_CACHE_KIB = 131072


def _sqlite_writer_pragmas(dbapi_conn: Any, record: Any) -> None:
    _sqlite_pragmas(dbapi_conn, record)
    cursor = dbapi_conn.cursor()
    cursor.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
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
        self._device_stmts: dict[bool | None, Any] = {}
        self._device_compiled: dict[bool, SQLCompiler] = {}
        # Per (table, columns): each column's bind processor (_insert_sqlite).
        self._sqlite_plans: dict[tuple[type[Base], tuple[str, ...]], list[tuple[int, Callable[[Any], Any]]]] = {}
        # The batch writer of a SQLite file (module docstring): the same file and pragmas through
        # pysqlite, on one thread, so batches commit in order and never contend with each other.
        self._writer: Engine | None = None
        self._write_thread: ThreadPoolExecutor | None = None
        if self._dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            sync_url = make_url(url).set(drivername="sqlite")
            if sync_url.database and sync_url.database != ":memory:":
                self._writer = create_engine(sync_url, json_serializer=_json_dumps, json_deserializer=_json_loads)
                event.listen(self._writer, "connect", _sqlite_writer_pragmas)
                # SQLAlchemy's executemany of a plain INSERT (dead letters) as multi-row INSERTs of
                # up to 1,000 rows, as insert_rows_sqlite does by hand (same reason). It does so for
                # the seen ids' INSERT ... RETURNING anyway, and for no upsert: the devices upsert
                # goes through bulk.upsert_rows_sqlite (measured with SQLAlchemy 2.0 on SQLite).
                self._writer.dialect.use_insertmanyvalues_wo_returning = True
                self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="registry-writer")

    async def create(self) -> None:
        async with self.engine.begin() as conn:
            if self._dialect == "postgresql":
                # Bridges started together would race to create the same tables (a duplicate pg_type
                # error stops the loser): one at a time, each sees what the previous one made.
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
            await conn.run_sync(upgrade)

    async def close(self) -> None:
        if self._write_thread is not None and self._writer is not None:
            await asyncio.get_running_loop().run_in_executor(self._write_thread, self._writer.dispose)
            self._write_thread.shutdown(wait=True)
        await self.engine.dispose()

    def _insert(self, table: Any) -> Any:
        return (postgresql.insert if self._dialect == "postgresql" else sqlite.insert)(table)

    async def commit_batch(self, batch: Batch) -> None:
        """Write a whole batch in one transaction."""
        if self._writer is not None and self._write_thread is not None:
            # Cancelled meanwhile, the thread still finishes (or rolls back) the transaction: its
            # messages stay unacknowledged, come again and are then duplicates of stored ones.
            await asyncio.get_running_loop().run_in_executor(self._write_thread, self._commit_sync, batch)
            return
        async with self.engine.begin() as conn:
            await conn.run_sync(self._write_batch_sync, batch)

    def _commit_sync(self, batch: Batch) -> None:
        assert self._writer is not None
        with self._writer.begin() as conn:
            self._write_batch_sync(conn, batch)

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
        if batch.results:
            if self._dialect == "sqlite":
                insert_rows_sqlite(conn, "results", RESULT_COLUMNS, batch.results)
            else:
                insert_results_postgresql(conn, batch.results)
        for table, rows in batch.rows.items():
            if self._dialect == "sqlite":
                self._insert_sqlite(conn, table, rows)
            else:
                conn.execute(self._insert(table).on_conflict_do_nothing(), rows)
        if batch.devices:
            values = [_device_values(key, delta) for key, delta in batch.devices.items()]
            if self._dialect == "sqlite":
                # Multi-row, as insert_rows_sqlite says why; `online_known` is per row in the
                # statement's SET clause, so the rows go in two statements, one per value of it.
                for known in (False, True):
                    rows = [v for v in values if v["online_known"] is known]
                    if rows:
                        upsert_rows_sqlite(conn, self._device_upsert_compiled(known, conn), rows)
            else:
                conn.execute(self._device_upsert(), values)
        for hook in batch.hooks:
            hook(conn)

    def _insert_sqlite(self, conn: Connection, table: type[Base], rows: list[dict[str, Any]]) -> None:
        """INSERT ... ON CONFLICT DO NOTHING of many rows straight through the driver (insert_rows_sqlite).

        SQLAlchemy's executemany spends ~3 µs per row building its parameters, more than SQLite
        takes to store the row (5.2 against 2.3 µs per result row): at 2-3 answers per result/2
        message that was a tenth of the bridge's CPU. Every row of one table in a batch comes from
        the same builder, so the first row's keys are the columns; values still pass through the
        columns' own bind processors (JSON, for one)."""
        columns = tuple(rows[0])
        t = cast(Table, table.__table__)
        converts = self._sqlite_plans.get((table, columns))
        if converts is None:
            converts = []
            for i, c in enumerate(columns):
                processor = t.c[c].type.bind_processor(conn.dialect)
                if processor is not None:
                    converts.append((i, processor))
            self._sqlite_plans[(table, columns)] = converts
        insert_rows_sqlite(conn, t.name, columns, bound_values(rows, columns, converts))

    def _device_upsert_compiled(self, online_known: bool, conn: Connection) -> SQLCompiler:
        compiled = self._device_compiled.get(online_known)
        if compiled is None:
            compiled = cast(SQLCompiler, self._device_upsert(online_known).compile(dialect=conn.dialect))
            self._device_compiled[online_known] = compiled
        return compiled

    def _device_upsert(self, online_known: bool | None = None) -> Any:
        """One statement for every device of a batch (executemany): counters add, last_seen takes the
        max, online and the model change only where the batch says something about them. With
        `online_known` given, that flag is a constant of the statement instead of a parameter."""
        stmt = self._device_stmts.get(online_known)
        if stmt is None:
            table = Device.__table__
            insert_ = self._insert(Device)
            new = insert_.excluded
            greatest = func.max if self._dialect == "sqlite" else func.greatest
            # Status messages of one device can be committed out of order (several bridges each
            # commit the copy they deduplicated first): the online state follows the status of
            # the highest order, and one without an order (older devices) as it comes.
            newer = or_(
                new.status_order.is_(None), table.c.status_order.is_(None), new.status_order >= table.c.status_order
            )
            if online_known is None:
                known: Any = bindparam("online_known", type_=Boolean)
            else:
                known = true() if online_known else false()
            stmt = self._device_stmts[online_known] = insert_.on_conflict_do_update(
                index_elements=["fleet_id", "device_id"],
                set_={
                    "last_seen": greatest(table.c.last_seen, new.last_seen),
                    "messages": table.c.messages + new.messages,
                    "telemetry_windows": table.c.telemetry_windows + new.telemetry_windows,
                    "samples": table.c.samples + new.samples,
                    "results": table.c.results + new.results,
                    "online": case((and_(known, newer), new.online), else_=table.c.online),
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
        return stmt

    async def add_agreement(self, counts: Iterable[tuple[tuple[str, str, str], tuple[int, int]]]) -> None:
        """Add (answered, agreed) escalation counts per (fleet, device, edge model version).

        One statement for every device (executemany), in key order: two bridges adding counts for the
        same devices lock their rows in the same order, so PostgreSQL never sees them deadlock (one
        row per device in arrival order did, and took the bridge down with 10,000 devices)."""
        rows = [
            {"fleet_id": f, "device_id": d, "model_version": v, "answered": answered, "agreed": agreed}
            for (f, d, v), (answered, agreed) in sorted(counts)
        ]
        if not rows:
            return
        table = Agreement.__table__
        stmt = self._insert(Agreement)
        stmt = stmt.on_conflict_do_update(
            index_elements=["fleet_id", "device_id", "model_version"],
            set_={
                "answered": table.c.answered + stmt.excluded.answered,
                "agreed": table.c.agreed + stmt.excluded.agreed,
            },
        )
        async with self.engine.begin() as conn:
            await conn.execute(stmt, rows)

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
