"""The outbox's SQLite file: schema, row codec, open (prepare, diagnose) and expiry at open.

WAL mode. `synchronous="NORMAL"` survives a process crash (`kill -9`) because every commit is in
the OS page cache before `put` returns; `"FULL"` also fsyncs each group commit and survives power
loss. The counters of evicted/expired/rejected rows live in the same file and are updated in the
same transaction as the deletes, so they persist across restarts.

On open: parent dirs are created, `PRAGMA quick_check` runs (the O(n) page check without the much
slower index cross-check of `integrity_check`, which matters on SD cards), WAL is switched on and a
write transaction is opened, so a read-only path fails at open with `OutboxUnavailableError`.
The rows whose `expires_at` passed are deleted in SQL (counted in `expired`), and the per-class
totals are then summed over the `(priority, id)` index: nothing per row is loaded.

Every function here that takes a connection runs in the writer thread (or in the thread that
opens the file), never on the event loop.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge_node.errors import OutboxCorruptError, OutboxUnavailableError
from edge_node.uplink.message import OutMessage, Priority, Stored

SynchronousMode = Literal["NORMAL", "FULL"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    priority INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    msg_id TEXT NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    expires_at REAL,
    user_properties TEXT,
    response_topic TEXT,
    correlation_data BLOB,
    content_type TEXT,
    nbytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    seq INTEGER
);
CREATE TABLE IF NOT EXISTS counters (
    kind TEXT NOT NULL,
    priority INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (kind, priority)
);
CREATE INDEX IF NOT EXISTS outbox_by_class ON outbox (priority, id, nbytes, expires_at);
CREATE TABLE IF NOT EXISTS sequences (
    name TEXT PRIMARY KEY,
    n INTEGER NOT NULL
);
"""
# The index covers what a page and the totals at open need, so neither reads the payloads.
_INSERT_INTO = (
    "INSERT INTO outbox (id, priority, topic, payload, msg_id, qos, retain, expires_at, user_properties,"
    " response_topic, correlation_data, content_type, nbytes, created_at, seq) VALUES "
)
_INSERT_COLUMNS = 15
# Rows per multi-row INSERT: 15 * 64 = 960 parameters, under the 999 of SQLite builds before 3.32.
ROWS_PER_INSERT = 64
_SELECT_COLUMNS = (
    "id, priority, topic, payload, msg_id, qos, retain, expires_at, user_properties, response_topic,"
    " correlation_data, content_type, seq"
)
# The sequence whose value is the highest `seq` handed out (reserved in blocks), and the one that
# holds the file's epoch (see `Loaded.epoch`).
SEQ_RESERVED = "seq_reserved"
_EPOCH = "epoch"
_SELECT_PAGE = (
    "SELECT id, nbytes, expires_at FROM outbox INDEXED BY outbox_by_class"
    " WHERE priority = ? AND id > ? ORDER BY id LIMIT ?"
)
_COUNT = (
    "INSERT INTO counters (kind, priority, n) VALUES (?, ?, ?)"
    " ON CONFLICT (kind, priority) DO UPDATE SET n = n + excluded.n"
)
_NEXT = (
    "INSERT INTO sequences (name, n) VALUES (?, ?)"
    " ON CONFLICT (name) DO UPDATE SET n = max(n + 1, excluded.n) RETURNING n"
)
# SQLite's default limit on bound parameters is 32766 since 3.32; stay far below it.
_FETCH_CHUNK = 500

# The kinds of the `counters` table: rows dropped unsent, and puts refused, per class.
KIND_EVICTED = "evicted"
KIND_EXPIRED = "expired"
KIND_REJECTED = "rejected"
KINDS = (KIND_EVICTED, KIND_EXPIRED, KIND_REJECTED)

PageRow = tuple[int, int, float | None]  # id, nbytes, expires_at
Row = tuple[Any, ...]  # an encoded row, in the INSERT's column order


@dataclass(slots=True)
class Loaded:
    """What open found in the file: totals per class, the highest id, counters, what expired."""

    conn: sqlite3.Connection
    classes: list[tuple[int, int, int]]  # (priority, rows, bytes)
    max_id: int
    counters: dict[str, dict[Priority, int]]  # {kind: {class: n}}, every kind and class present
    expired: dict[Priority, int]
    # A random number drawn when the file was created: confirmations name it, so a confirmation
    # meant for an earlier file (deleted, replaced) cannot delete this one's rows.
    epoch: int
    seq_reserved: int  # every seq up to this may have been handed out: new ones start above it


def unavailable(path: Path, action: str, err: BaseException) -> OutboxUnavailableError:
    """The error for a failed `action` on the file, with what the filesystem says and the fix."""
    name = getattr(err, "sqlite_errorname", type(err).__name__)
    if name == "SQLITE_FULL" or "disk is full" in str(err):
        fix = "free disk space on that filesystem or lower the outbox max_bytes"
    else:
        fix = (
            "make the directory and file writable by this process (uid/permissions, read-only mount)"
            " or configure another outbox path"
        )
    return OutboxUnavailableError(f"outbox {path}: cannot {action}: {name}: {err}{_diagnose(path)}; fix: {fix}")


def _diagnose(path: Path) -> str:
    """Why the path is not writable, when the filesystem can tell (read-only mount, permissions)."""
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f" ({probe} is not a directory)"
    try:
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            return f" ({probe} is on a filesystem mounted read-only)"
    except OSError:
        return ""
    if not os.access(probe, os.W_OK):
        return f" ({probe} is not writable by uid {os.geteuid()})"
    return ""


def open_db(path: Path, synchronous: SynchronousMode, now: float) -> Loaded:
    """Create/open the file, switch to WAL, check integrity, drop expired rows, read the totals.

    Runs in a thread.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise unavailable(path, "create its directory", err) from err
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as err:
        raise unavailable(path, "open", err) from err
    try:
        return _prepare(conn, path, synchronous, now)
    except BaseException:
        conn.close()
        raise


def _prepare(conn: sqlite3.Connection, path: Path, synchronous: SynchronousMode, now: float) -> Loaded:
    try:
        check = conn.execute("PRAGMA quick_check").fetchone()
    except sqlite3.DatabaseError as err:
        if getattr(err, "sqlite_errorname", "") == "SQLITE_NOTADB":
            raise OutboxCorruptError(
                f"outbox {path}: not an SQLite database ({err}); fix: move the file aside and restart"
            ) from err
        raise unavailable(path, "read", err) from err
    if check is None or check[0] != "ok":
        raise OutboxCorruptError(
            f"outbox {path}: integrity check failed ({check}); fix: move the file aside and restart"
        )
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OutboxUnavailableError(
                f"outbox {path}: journal_mode is {mode!r}, WAL is required;"
                " fix: put the outbox on a local filesystem that supports shared memory"
            )
        conn.execute(f"PRAGMA synchronous={synchronous}")
        # BEGIN IMMEDIATE takes the write lock: a read-only file or mount fails here, at open,
        # rather than at the first put.
        conn.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        _add_missing_columns(conn)
        epoch = _epoch(conn)
        expired = _drop_expired_rows(conn, now)
        conn.execute("COMMIT")
        # Totals, not rows: what makes a reopen with a million queued rows cost no memory.
        classes = conn.execute(
            "SELECT priority, COUNT(*), TOTAL(nbytes) FROM outbox INDEXED BY outbox_by_class GROUP BY priority"
        ).fetchall()
        max_id = conn.execute("SELECT MAX(id) FROM outbox").fetchone()[0] or 0
        reserved = conn.execute("SELECT n FROM sequences WHERE name = ?", (SEQ_RESERVED,)).fetchone()
        counters = {kind: dict.fromkeys(Priority, 0) for kind in KINDS}
        for kind, prio, n in conn.execute("SELECT kind, priority, n FROM counters"):
            if kind in counters:
                counters[kind][Priority(prio)] = int(n)
    except sqlite3.Error as err:
        raise unavailable(path, "write", err) from err
    return Loaded(
        conn=conn,
        classes=[(int(p), int(n), int(b)) for p, n, b in classes],
        max_id=int(max_id),
        counters=counters,
        expired=expired,
        epoch=epoch,
        seq_reserved=int(reserved[0]) if reserved else 0,
    )


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Files made before a column existed get it (empty): `seq` came with confirmed delivery."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
    if "seq" not in columns:
        conn.execute("ALTER TABLE outbox ADD COLUMN seq INTEGER")


def _epoch(conn: sqlite3.Connection) -> int:
    """The file's epoch, drawn (and stored, in the open transaction) the first time."""
    row = conn.execute("SELECT n FROM sequences WHERE name = ?", (_EPOCH,)).fetchone()
    if row is not None:
        return int(row[0])
    epoch = int.from_bytes(os.urandom(8), "big") >> 1  # SQLite integers are signed 64-bit
    conn.execute("INSERT INTO sequences (name, n) VALUES (?, ?)", (_EPOCH, epoch))
    return epoch


def _drop_expired_rows(conn: sqlite3.Connection, now: float) -> dict[Priority, int]:
    """Delete the rows whose `expires_at` passed and count them (inside open's transaction).

    This covers the whole file; while the outbox is open, `take` and `drop_expired` drop the expired
    rows of the in-memory pages (see index.py), rows only in the file when they are paged in.
    """
    where = "expires_at IS NOT NULL AND expires_at <= ?"
    counts = {
        Priority(p): int(n)
        for p, n in conn.execute(f"SELECT priority, COUNT(*) FROM outbox WHERE {where} GROUP BY priority", (now,))
    }
    if counts:
        conn.execute(f"DELETE FROM outbox WHERE {where}", (now,))
        conn.executemany(_COUNT, ((KIND_EXPIRED, int(p), n) for p, n in counts.items()))
    return counts


# ---- row codec -------------------------------------------------------------------------------


def encode_row(row_id: int, msg: OutMessage, nbytes: int, now: float) -> Row:
    props = json.dumps(msg.user_properties) if msg.user_properties else None
    return (
        row_id,
        int(msg.priority),
        msg.topic,
        msg.payload,
        msg.msg_id,
        msg.qos,
        int(msg.retain),
        msg.expires_at,
        props,
        msg.response_topic,
        msg.correlation_data,
        msg.content_type,
        nbytes,
        now,
        msg.seq,
    )


def row_key(row: Row) -> tuple[int, int, int]:
    """(id, priority, nbytes) of an encoded row: what the loop must forget if its insert failed."""
    return int(row[0]), int(row[1]), int(row[12])


def _decode_row(row: tuple[Any, ...]) -> Stored:
    (row_id, prio, topic, payload, msg_id, qos, retain, expires_at, props, resp, corr, ctype, seq) = row
    user_props = tuple((str(k), str(v)) for k, v in json.loads(props)) if props else ()
    msg = OutMessage(
        topic=topic,
        payload=bytes(payload),
        priority=Priority(prio),
        msg_id=msg_id,
        qos=qos,
        retain=bool(retain),
        expires_at=expires_at,
        user_properties=user_props,
        response_topic=resp,
        correlation_data=None if corr is None else bytes(corr),
        content_type=ctype,
        seq=seq,
    )
    return Stored(row_id=row_id, msg=msg)


# ---- statements the writer thread runs ---------------------------------------------------------


def insert_rows(conn: sqlite3.Connection, rows: list[Row]) -> None:
    """Insert up to ROWS_PER_INSERT encoded rows with one multi-row INSERT."""
    if rows:
        conn.execute(_insert_sql(len(rows)), [value for row in rows for value in row])


@functools.cache
def _insert_sql(n_rows: int) -> str:
    row = "(" + ", ".join("?" * _INSERT_COLUMNS) + ")"
    return _INSERT_INTO + ", ".join([row] * n_rows)


def delete_rows(conn: sqlite3.Connection, ids: Iterable[int]) -> None:
    conn.executemany("DELETE FROM outbox WHERE id = ?", ((i,) for i in ids))


def add_counts(conn: sqlite3.Connection, counts: dict[tuple[str, int], int]) -> None:
    """Add to the persisted counters: {(kind, priority): n}."""
    conn.executemany(_COUNT, ((k, p, n) for (k, p), n in counts.items()))


def fetch_rows(conn: sqlite3.Connection, ids: list[int]) -> list[Stored]:
    """The stored rows of `ids`, in that order; ids not in the file are left out."""
    found: dict[int, Stored] = {}
    for start in range(0, len(ids), _FETCH_CHUNK):
        chunk = ids[start : start + _FETCH_CHUNK]
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT {_SELECT_COLUMNS} FROM outbox WHERE id IN ({marks})"
        for row in conn.execute(sql, chunk):
            stored = _decode_row(row)
            found[stored.row_id] = stored
    return [found[i] for i in ids if i in found]


def read_page(conn: sqlite3.Connection, priority: Priority, after: int, limit: int) -> list[PageRow]:
    """The next `limit` rows of a class after id `after`: ids, sizes and expiry only (index-covered)."""
    rows: list[PageRow] = conn.execute(_SELECT_PAGE, (int(priority), after, limit)).fetchall()
    return rows


def next_in_sequence(conn: sqlite3.Connection, name: str, at_least: int) -> int:
    """Advance the sequence `name` (to at least `at_least`) and commit; returns its new value."""
    (n,) = conn.execute(_NEXT, (name, at_least)).fetchone()
    if conn.in_transaction:  # RETURNING keeps the statement's transaction open
        conn.execute("COMMIT")
    return int(n)
