"""Bulk INSERTs of the registry's hot path, written past SQLAlchemy's per-row parameter handling.

Each batch writes thousands of rows (result rows above all: one per answer). Through an executemany
each row costs Python work for its parameters and, on PostgreSQL, one INSERT on the server; here a
batch is a few statements: multi-row VALUES on SQLite, one array per column through unnest on
PostgreSQL. Both are ON CONFLICT DO NOTHING: a redelivered message adds nothing.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.sql.compiler import SQLCompiler

# Rows per multi-row INSERT on SQLite (insert_rows_sqlite): bound by the statement's variable limit
# (32,766 since SQLite 3.32, 999 before).
_SQLITE_VARIABLES = 32766 if sqlite3.sqlite_version_info >= (3, 32) else 999
_ROWS_PER_INSERT = 500


def insert_rows_sqlite(conn: Connection, table: str, columns: tuple[str, ...], rows: Sequence[Sequence[Any]]) -> None:
    """INSERT ... VALUES (...), (...), ... ON CONFLICT DO NOTHING, up to _ROWS_PER_INSERT rows a
    statement. One row per execution (executemany) let pysqlite release and retake the GIL for
    every row; on the registry's writer thread, beside an event loop that holds the GIL, each retake
    waited its turn: 29 us per result row at 10,000 devices, for SQLite work of a few."""
    _execute_chunks(conn, _one_row_sql(table, columns), len(columns), rows)


def upsert_rows_sqlite(conn: Connection, compiled: SQLCompiler, rows: Sequence[dict[str, Any]]) -> None:
    """A compiled one-row INSERT (an upsert: ON CONFLICT DO UPDATE may follow) run for many rows as
    multi-row VALUES statements, for the reason insert_rows_sqlite gives. Its bind parameters must
    all be in the VALUES group (constants elsewhere); values pass through their types' processors
    (booleans to 0/1, JSON...)."""
    sql, names = _multirow_plan(compiled)
    processors = [compiled.binds[name].type.bind_processor(conn.dialect) for name in names]
    converts = [(i, convert) for i, convert in enumerate(processors) if convert is not None]
    _execute_chunks(conn, sql, len(names), bound_values(rows, names, converts))


def bound_values(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], converts: Sequence[tuple[int, Callable[[Any], Any]]]
) -> list[list[Any]]:
    """Each row's values in `columns` order, the i-th passed through its bind processor where
    `converts` has one ((i, processor) pairs)."""
    params = [[row[c] for c in columns] for row in rows]
    for i, convert in converts:
        for values in params:
            values[i] = convert(values[i])
    return params


def _execute_chunks(conn: Connection, one_row_sql: str, width: int, rows: Sequence[Sequence[Any]]) -> None:
    """`one_row_sql` (VALUES of `width` placeholders) run for `rows`, up to _ROWS_PER_INSERT a statement."""
    per = max(1, min(_ROWS_PER_INSERT, _SQLITE_VARIABLES // width))
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        conn.exec_driver_sql(_spliced(one_row_sql, width, len(chunk)), tuple(v for row in chunk for v in row))


@functools.lru_cache(maxsize=64)
def _one_row_sql(table: str, columns: tuple[str, ...]) -> str:
    names = ", ".join(f'"{c}"' for c in columns)
    return f'INSERT INTO "{table}" ({names}) VALUES {_placeholders(len(columns))} ON CONFLICT DO NOTHING'


def _multirow_plan(compiled: SQLCompiler) -> tuple[str, tuple[str, ...]]:
    names = tuple(compiled.positiontup or ())
    sql = str(compiled)
    if sql.count("?") != len(names) or f"VALUES {_placeholders(len(names))}" not in sql:
        raise ValueError(f"not a one-row INSERT with every parameter in its VALUES: {sql[:200]}")
    return sql, names


def _placeholders(width: int) -> str:
    return f"({', '.join('?' * width)})"


@functools.lru_cache(maxsize=256)  # full chunks and a few remainders per statement
def _spliced(one_row_sql: str, width: int, rows: int) -> str:
    one = _placeholders(width)
    return one_row_sql.replace(f"VALUES {one}", f"VALUES {', '.join([one] * rows)}", 1)


# The columns of a `Batch.results` tuple, in order, with their PostgreSQL types (the unnest arrays').
_RESULT_COLUMN_TYPES = (
    ("msg_id", "VARCHAR"),
    ("seq", "INTEGER"),
    ("fleet_id", "VARCHAR"),
    ("device_id", "VARCHAR"),
    ("inference_id", "VARCHAR"),
    ("model_version", "VARCHAR"),
    ("label", "VARCHAR"),
    ("path", "VARCHAR"),
    ("confidence", "FLOAT"),
    ("truth", "VARCHAR"),
    ("ts", "FLOAT"),
)
RESULT_COLUMNS = tuple(c for c, _ in _RESULT_COLUMN_TYPES)
_ROWS_PER_UNNEST = 20_000


@functools.lru_cache(maxsize=1)
def _unnest_results() -> Any:
    names = ", ".join(RESULT_COLUMNS)
    arrays = ", ".join(f"CAST(:{c} AS {t}[])" for c, t in _RESULT_COLUMN_TYPES)
    return text(f"INSERT INTO results ({names}) SELECT * FROM unnest({arrays}) ON CONFLICT DO NOTHING")


def insert_results_postgresql(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Result rows (tuples in RESULT_COLUMNS order) as one INSERT ... SELECT FROM unnest(arrays) per
    _ROWS_PER_UNNEST rows: one array per column, one statement for the lot. As an executemany of one
    row each, the bridge spent ~10 us a row building parameters and PostgreSQL ran one INSERT per
    answer (~9 answers per result/2 message, the most rows by far)."""
    for start in range(0, len(rows), _ROWS_PER_UNNEST):
        columns = zip(*rows[start : start + _ROWS_PER_UNNEST], strict=True)
        conn.execute(_unnest_results(), dict(zip(RESULT_COLUMNS, map(list, columns), strict=True)))
