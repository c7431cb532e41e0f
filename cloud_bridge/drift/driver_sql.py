"""The drift state's hot statements as plain SQL with tuples for parameters (cloud_bridge/drift/state.py
uses them): SQLAlchemy's statement building and parameter processing cost more per row than the
database takes to write the row (the same trade as Registry._insert_sqlite). `save` writes windows,
deletions and states in one executemany each; `tokens` reads (and on PostgreSQL locks) the state
rows' tokens.

On PostgreSQL the keys go as four arrays (`unnest`), locked `FOR UPDATE` in key order as before;
statements go through SQLAlchemy's connection (`exec_driver_sql`: asyncpg's own executemany).

Rows of many keys are read by joining a VALUES list on the primary key: SQLite scans the whole table
for a row-value `IN (VALUES ...)` (SQLAlchemy's rendering of `tuple_(...).in_(...)`), which at
10,000 devices cost ~4 ms per batch of 200 where the join costs ~0.5 ms.

With aiosqlite each statement through SQLAlchemy is three or four hops to the connection's thread
(cursor, execute, fetch, close): ~110-160 us of CPU, against ~35 us for aiosqlite's own
`execute_fetchall` and `executemany`, one hop each. So `Driver` sends them to the aiosqlite
connection under SQLAlchemy's (the same sqlite3 connection, so the same transaction), from the
greenlet that runs the batch (`await_only`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, cast

import aiosqlite
import orjson
from sqlalchemy.engine import Connection
from sqlalchemy.util import await_only

from cloud_bridge.registry.bulk import insert_rows_sqlite

Key = tuple[str, str, str, str]  # fleet, device, model name, model version

_KEY_COLUMNS = ("fleet_id", "device_id", "model_name", "model_version")
# Keys per statement: 4 or 5 parameters each, well under SQLite's 32,766 (3.32+).
_CHUNK = 2000

WINDOW_COLUMNS = (*_KEY_COLUMNS, "window_end", "msg_id", "window_start", "count", "stats")
_QUOTED_WINDOW_COLUMNS = ", ".join(f'"{c}"' for c in WINDOW_COLUMNS)


def _marks(dialect: str, first: int, n: int) -> list[str]:
    return ["?"] * n if dialect == "sqlite" else [f"${i}" for i in range(first, first + n)]


def _statements(dialect: str) -> tuple[str, str, str]:
    """INSERT of windows (WINDOW_COLUMNS), DELETE of a key's windows before a cutoff, UPDATE of a
    state (kinds JSON text, last window end, token, now, then the key)."""
    m = _marks(dialect, 1, len(WINDOW_COLUMNS))
    insert = f"INSERT INTO drift_windows ({_QUOTED_WINDOW_COLUMNS}) VALUES ({', '.join(m)}) ON CONFLICT DO NOTHING"
    k = _marks(dialect, 1, 5)
    where = " AND ".join(f"{c} = {mark}" for c, mark in zip(_KEY_COLUMNS, k, strict=False))
    delete = f"DELETE FROM drift_windows WHERE {where} AND window_end < {k[4]}"
    u = _marks(dialect, 1, 8)
    where = " AND ".join(f"{c} = {mark}" for c, mark in zip(_KEY_COLUMNS, u[4:], strict=True))
    update = (
        f"UPDATE drift_states SET kinds = {u[0]}, last_window_end = {u[1]}, version = {u[2]}, "
        f"updated_at = {u[3]} WHERE {where}"
    )
    return insert, delete, update


_SQLITE = _statements("sqlite")
_POSTGRESQL = _statements("postgresql")
_PG_TOKENS = (
    "SELECT s.fleet_id, s.device_id, s.model_name, s.model_version, s.version "
    "FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::varchar[]) AS k(f, d, m, v) "
    "JOIN drift_states s ON s.fleet_id = k.f AND s.device_id = k.d AND s.model_name = k.m AND s.model_version = k.v "
    # Key order: bridges lock the rows they share in the same order, so they cannot deadlock.
    "ORDER BY s.fleet_id, s.device_id, s.model_name, s.model_version FOR UPDATE OF s"
)


# A key's windows in window order, with their stats only after the key's cut (the reader holds the
# older ones): `windows_after`.
_WINDOW_SELECT = (
    "SELECT s.fleet_id, s.device_id, s.model_name, s.model_version, s.window_start, s.window_end, s.count, "
    "CASE WHEN s.window_end > k.cut THEN s.stats END "
)
_WINDOW_JOIN = (
    "JOIN drift_windows s ON s.fleet_id = k.f AND s.device_id = k.d AND s.model_name = k.m "
    "AND s.model_version = k.v "
    "ORDER BY s.fleet_id, s.device_id, s.model_name, s.model_version, s.window_end, s.msg_id"
)
_PG_WINDOWS = (
    _WINDOW_SELECT + "FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::varchar[], $5::float8[]) "
    "AS k(f, d, m, v, cut) " + _WINDOW_JOIN
)


class Driver:
    """Statements straight to the driver's connection (sqlite3, or aiosqlite: one hop each)."""

    def __init__(self, conn: Connection) -> None:
        raw = conn.connection.driver_connection
        self._aio = raw if isinstance(raw, aiosqlite.Connection) else None
        self._sync = raw if isinstance(raw, sqlite3.Connection) else None
        self._conn = conn

    def fetchall(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        if self._aio is not None:
            rows = self._aio.execute_fetchall(sql, params)
            return list(await_only(cast(Awaitable[Iterable[tuple[Any, ...]]], rows)))
        if self._sync is not None:
            return self._sync.execute(sql, params).fetchall()
        return [tuple(r) for r in self._conn.exec_driver_sql(sql, tuple(params))]

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if self._aio is not None:
            await_only(self._aio.executemany(sql, rows))
        elif self._sync is not None:
            self._sync.executemany(sql, rows)
        else:
            self._conn.exec_driver_sql(sql, rows)


def keyed_rows(
    conn: Connection, table: str, columns: Sequence[str], keys: Sequence[Key], order: Sequence[str] = ()
) -> list[tuple[Any, ...]]:
    """(key columns..., columns...) of the rows of `table` whose key is in `keys`; with `order`, in key
    order and then by those columns."""
    names = ", ".join(f's."{c}"' for c in (*_KEY_COLUMNS, *columns))
    on = " AND ".join(f's."{c}" = k.c{i}' for i, c in enumerate(_KEY_COLUMNS))
    by = ", ".join(f's."{c}"' for c in (*_KEY_COLUMNS, *order))
    sort = f" ORDER BY {by}" if order else ""  # (key order itself matters to no caller on SQLite)
    return _fetch_joined(
        conn,
        keys,
        lambda values: (
            f"WITH k(c0, c1, c2, c3) AS (VALUES {values}) SELECT {names} FROM k JOIN {table} s ON {on}{sort}"
        ),
    )


def _fetch_joined(conn: Connection, rows: Sequence[Sequence[Any]], sql: Callable[[str], str]) -> list[tuple[Any, ...]]:
    """SQLite: run `sql(values)` for each chunk of `rows` (`values` their VALUES list, one `?` per
    part) through the driver, and the rows all chunks returned."""
    driver = Driver(conn)
    out: list[tuple[Any, ...]] = []
    for at in range(0, len(rows), _CHUNK):
        chunk = rows[at : at + _CHUNK]
        group = "(" + ", ".join(["?"] * len(chunk[0])) + ")"
        out.extend(driver.fetchall(sql(", ".join([group] * len(chunk))), [part for row in chunk for part in row]))
    return out


def json_value(text: str | bytes | None) -> Any:
    """A JSON column's value as read through the driver (None stays None)."""
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        # Rows written by stdlib json before orjson may hold NaN/Infinity, which only it reads.
        return json.loads(text)


def tokens(conn: Connection, keys: list[Key]) -> dict[Key, int | None]:
    """The token (`version`) of every state row among `keys`, locked on PostgreSQL (on SQLite the
    batch already holds the database's write lock)."""
    if conn.dialect.name == "sqlite":
        rows = keyed_rows(conn, "drift_states", ["version"], keys)
    else:
        columns = tuple([key[i] for key in keys] for i in range(4))
        rows = [tuple(r) for r in conn.exec_driver_sql(_PG_TOKENS, columns)]
    return {(r[0], r[1], r[2], r[3]): r[4] for r in rows}


def save(
    conn: Connection,
    windows: list[tuple[Any, ...]],
    dropped: list[tuple[str, str, str, str, float]],
    states: list[tuple[Any, ...]],
) -> None:
    """`StateRows.save`'s three executemany: new windows (WINDOW_COLUMNS), windows older than a
    cutoff (key, cutoff), state rows (kinds JSON text, last window end, token, now, key)."""
    if conn.dialect.name == "sqlite":
        driver = Driver(conn)
        run = driver.executemany
        insert, delete, update = _SQLITE
    else:
        insert, delete, update = _POSTGRESQL

        def run(sql: str, rows: list[tuple[Any, ...]]) -> None:
            conn.exec_driver_sql(sql, rows)

    if windows:
        if conn.dialect.name == "sqlite":
            insert_rows_sqlite(conn, "drift_windows", WINDOW_COLUMNS, windows)
        else:
            run(insert, windows)
    if dropped:
        run(delete, dropped)
    if states:
        run(update, states)


def windows_after(conn: Connection, cuts: Sequence[tuple[Key, float]]) -> list[tuple[Any, ...]]:
    """(key..., window_start, window_end, count, stats) of every stored window of these keys, in key
    and window order; `stats` is None for windows not after the key's cut (-inf: all of them)."""
    if conn.dialect.name != "sqlite":
        columns = (*([key[i] for key, _ in cuts] for i in range(4)), [cut for _, cut in cuts])
        return [tuple(r) for r in conn.exec_driver_sql(_PG_WINDOWS, columns)]
    return _fetch_joined(
        conn,
        [(*key, cut) for key, cut in cuts],
        lambda values: f"WITH k(f, d, m, v, cut) AS (VALUES {values}) {_WINDOW_SELECT}FROM k {_WINDOW_JOIN}",
    )
