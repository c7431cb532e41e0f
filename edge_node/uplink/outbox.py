"""Durable SQLite outbox: every outbound message of the edge node is committed here first.

A message leaves the outbox only when the broker acknowledged it (the link calls `ack`), so a broker
outage, a cut link or `kill -9` loses nothing that `put` had returned for.

Design, and why the stdlib `sqlite3` in one dedicated writer thread rather than aiosqlite:

* Group commit (docs/traps.md #4). Operations (inserts, acked deletes, evictions, fetches) made during
  one event-loop iteration are handed to the writer thread as one list; the thread takes everything
  that queued up while its previous transaction ran (up to `max_batch` rows) and commits it as ONE
  transaction, then wakes every waiting `put` with a single `call_soon_threadsafe`. The batch size
  adapts to the load by itself: an idle outbox commits a row at once (no artificial linger), a busy
  one hundreds per commit. aiosqlite would cost a thread hop each way per awaited call (≈ 60 µs) and
  hide the queue we need to batch over.
* Memory stays flat however deep the queue gets: the rows live in the file, the loop keeps only
  counters (rows and bytes per priority class), the rows in flight (bounded by the link's window)
  and, per class, a bounded *page* of the oldest pending rows' ids, sizes and expiry times. A page
  is read from SQLite (one indexed range query on `(priority, id)`) when a class's page runs low,
  so `take`, `ack` and the stats never wait for SQLite in the steady state. Per class, every
  pending row with an id up to the page's `cursor` is in the page; the rows above it exist only in
  the file until paged in. A put appends to its class's page directly while nothing of that class
  waits in the file (the common, shallow case), else it goes to the file only. Eviction needs the
  oldest rows of the victim classes: when a victim's page is exhausted the put awaits the next
  page (puts are serialised for that, under a lock that costs nothing when uncontended).
* Row ids are assigned on the loop, in put order, so acks, evictions and inserts can be queued to
  the single writer in order without waiting for `lastrowid`. A row becomes visible to `take` only
  once its transaction committed (`_committed_upto`, or read back by a page query): nothing is
  ever sent that a crash could forget.
* WAL mode. `synchronous="NORMAL"` survives a process crash (`kill -9`) because every commit is in
  the OS page cache before `put` returns; `"FULL"` also fsyncs each group commit and survives power
  loss. The counters of evicted/expired/rejected rows live in the same file and are updated in the
  same transaction as the deletes, so they persist across restarts.

Bounded by `max_bytes` (topic + payload bytes of the stored rows). A put that would exceed it evicts
pending rows of its own class or a lower one (SAMPLES first, oldest first), never a row in flight,
never a CONTROL row, never a row of a higher class than the new message: a sample must not push out
an escalation. If that cannot make room the put raises `OutboxFullError` (counted in `rejected`);
it never waits for the uplink (at most for one page read from the file), so inference never does.
Escalation requests carry their deadline as `expires_at`: an expired row is dropped (counted in
`expired`), never sent: `take` checks every row it hands out, `open` deletes the expired rows of
the whole file in SQL, and `drop_expired` drops those in the in-memory pages (rows still only in
the file are dropped when paged in, or at the next open).

On open: parent dirs are created, `PRAGMA quick_check` runs (the O(n) page check without the much
slower index cross-check of `integrity_check`, which matters on SD cards), WAL is switched on and a
write transaction is opened, so a read-only path fails at open with `OutboxUnavailableError`.
The per-class totals are then summed over the `(priority, id)` index: nothing per row is loaded.

Thread safety: every public method must be called from the event loop thread that opened the
outbox; only the writer thread touches the sqlite3 connection.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal

from edge_node.errors import OutboxClosedError, OutboxCorruptError, OutboxFullError, OutboxUnavailableError

log = logging.getLogger(__name__)

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
    created_at REAL NOT NULL
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
    " response_topic, correlation_data, content_type, nbytes, created_at) VALUES "
)
_INSERT_COLUMNS = 14
# Rows per multi-row INSERT: 14 * 64 = 896 parameters, under the 999 of SQLite builds before 3.32.
_ROWS_PER_INSERT = 64
_SELECT_COLUMNS = (
    "id, priority, topic, payload, msg_id, qos, retain, expires_at, user_properties, response_topic,"
    " correlation_data, content_type"
)
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
# Rows per page read from the file, per class. 5 classes x 512 rows x ~150 B is the whole index
# the loop keeps beyond the rows in flight; a page is one indexed range read (~0.5 ms).
DEFAULT_PAGE_ROWS = 512

_KIND_EVICTED = "evicted"
_KIND_EXPIRED = "expired"
_KIND_REJECTED = "rejected"


class Priority(IntEnum):
    """Replay order of the outbox: lower value first, oldest first within a class."""

    CONTROL = 0
    ESCALATION = 1
    TELEMETRY = 2
    RESULTS = 3
    SAMPLES = 4


# Who may be evicted for a message of each class: its own class or lower, SAMPLES first, never CONTROL.
_VICTIMS: dict[Priority, tuple[Priority, ...]] = {
    prio: tuple(p for p in reversed(Priority) if p >= prio and p != Priority.CONTROL) for prio in Priority
}


@dataclass(slots=True)
class OutMessage:
    """One outbound MQTT message. `expires_at` is unix seconds: past it the row is dropped, not sent.

    Treat it as immutable (use `dataclasses.replace`). It is not declared frozen because a frozen
    dataclass sets each field through `object.__setattr__`: ~6x the construction cost, paid for
    every result, sample and telemetry message on the pipeline's hot path.
    """

    topic: str
    payload: bytes
    priority: Priority
    msg_id: str
    qos: int = 1
    retain: bool = False
    expires_at: float | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    response_topic: str | None = None
    correlation_data: bytes | None = None
    content_type: str | None = None


@dataclass(frozen=True, slots=True)
class Stored:
    """A row handed out by `Outbox.take`: ack it with `row_id` once the broker acknowledged it."""

    row_id: int
    msg: OutMessage


@dataclass(slots=True)
class _Meta:
    priority: Priority
    nbytes: int
    expires_at: float | None


@dataclass(slots=True)
class _Class:
    """The pending rows of one priority class: totals, and the page of the oldest ones in memory.

    Invariant: every pending row of the class with id <= `cursor` is in `page` (in id order); the
    rows above it are only in the file. `count`/`nbytes` cover both.
    """

    priority: Priority
    page: OrderedDict[int, _Meta] = field(default_factory=OrderedDict)
    cursor: int = 0
    count: int = 0
    nbytes: int = 0
    paging: asyncio.Future[int] | None = None  # the page read in flight, at most one per class

    @property
    def in_file_only(self) -> int:
        return self.count - len(self.page)


@dataclass(slots=True)
class _NeedPage:
    """`_admit` cannot decide before the next page of this class is read (eviction past its page)."""

    priority: Priority


@dataclass(slots=True)
class _Insert:
    rows: list[tuple[Any, ...]]
    future: asyncio.Future[None]


@dataclass(slots=True)
class _Delete:
    ids: list[int]
    counts: dict[tuple[str, int], int] = field(default_factory=dict)


@dataclass(slots=True)
class _Fetch:
    ids: list[int]
    future: asyncio.Future[list[Stored]]


@dataclass(slots=True)
class _Page:
    priority: Priority
    after: int
    limit: int
    future: asyncio.Future[int]


@dataclass(slots=True)
class _Close:
    future: asyncio.Future[None]


@dataclass(slots=True)
class _Next:
    name: str
    at_least: int
    future: asyncio.Future[int]


_Op = _Insert | _Delete | _Fetch | _Page | _Close | _Next
_PageRow = tuple[int, int, float | None]  # id, nbytes, expires_at


@dataclass(slots=True)
class _BatchOutcome:
    """What the writer thread reports back to the loop after one group commit."""

    committed_upto: int = 0
    failed: list[tuple[int, int, int]] = field(default_factory=list)  # (id, priority, nbytes)
    write_error: OutboxUnavailableError | None = None
    pages: list[tuple[_Page, list[_PageRow]]] = field(default_factory=list)
    # (future, result, error): Any because the futures carry different result types.
    resolutions: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = field(default_factory=list)


@dataclass(slots=True)
class _Loaded:
    """What open found in the file: totals per class, the highest id, counters, what expired."""

    conn: sqlite3.Connection
    classes: list[tuple[int, int, int]]  # (priority, rows, bytes)
    max_id: int
    counters: list[tuple[str, int, int]]
    expired: dict[Priority, int]


def _unavailable(path: Path, action: str, err: BaseException) -> OutboxUnavailableError:
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


def _open_db(path: Path, synchronous: SynchronousMode, now: float) -> _Loaded:
    """Create/open the file, switch to WAL, check integrity, drop expired rows, read the totals.

    Runs in a thread.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unavailable(path, "create its directory", err) from err
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as err:
        raise _unavailable(path, "open", err) from err
    try:
        return _prepare(conn, path, synchronous, now)
    except BaseException:
        conn.close()
        raise


def _prepare(conn: sqlite3.Connection, path: Path, synchronous: SynchronousMode, now: float) -> _Loaded:
    try:
        check = conn.execute("PRAGMA quick_check").fetchone()
    except sqlite3.DatabaseError as err:
        if getattr(err, "sqlite_errorname", "") == "SQLITE_NOTADB":
            raise OutboxCorruptError(
                f"outbox {path}: not an SQLite database ({err}); fix: move the file aside and restart"
            ) from err
        raise _unavailable(path, "read", err) from err
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
        expired = _drop_expired_rows(conn, now)
        conn.execute("COMMIT")
        # Totals, not rows: what makes a reopen with a million queued rows cost no memory.
        classes = conn.execute(
            "SELECT priority, COUNT(*), TOTAL(nbytes) FROM outbox INDEXED BY outbox_by_class GROUP BY priority"
        ).fetchall()
        max_id = conn.execute("SELECT MAX(id) FROM outbox").fetchone()[0] or 0
        counters = conn.execute("SELECT kind, priority, n FROM counters").fetchall()
    except sqlite3.Error as err:
        raise _unavailable(path, "write", err) from err
    return _Loaded(
        conn=conn,
        classes=[(int(p), int(n), int(b)) for p, n, b in classes],
        max_id=int(max_id),
        counters=counters,
        expired=expired,
    )


def _drop_expired_rows(conn: sqlite3.Connection, now: float) -> dict[Priority, int]:
    """Delete the rows whose `expires_at` passed and count them (inside open's transaction)."""
    where = "expires_at IS NOT NULL AND expires_at <= ?"
    counts = {
        Priority(p): int(n)
        for p, n in conn.execute(f"SELECT priority, COUNT(*) FROM outbox WHERE {where} GROUP BY priority", (now,))
    }
    if counts:
        conn.execute(f"DELETE FROM outbox WHERE {where}", (now,))
        conn.executemany(_COUNT, ((_KIND_EXPIRED, int(p), n) for p, n in counts.items()))
    return counts


def _encode_row(row_id: int, msg: OutMessage, nbytes: int, now: float) -> tuple[object, ...]:
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
    )


def _insert_rows(conn: sqlite3.Connection, rows: list[tuple[object, ...]]) -> None:
    """Insert up to _ROWS_PER_INSERT encoded rows with one multi-row INSERT."""
    if rows:
        conn.execute(_insert_sql(len(rows)), [value for row in rows for value in row])


@functools.cache
def _insert_sql(n_rows: int) -> str:
    row = "(" + ", ".join("?" * _INSERT_COLUMNS) + ")"
    return _INSERT_INTO + ", ".join([row] * n_rows)


def _decode_row(row: tuple[Any, ...]) -> Stored:
    (row_id, prio, topic, payload, msg_id, qos, retain, expires_at, props, resp, corr, ctype) = row
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
    )
    return Stored(row_id=row_id, msg=msg)


def _message_size(msg: OutMessage) -> int:
    return len(msg.topic.encode()) + len(msg.payload)


def _failed_rows(op: _Insert) -> list[tuple[int, int, int]]:
    return [(int(r[0]), int(r[1]), int(r[12])) for r in op.rows]


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # A future nobody awaits (a prefetch, a failed put's earlier commits) must not end as
    # "exception was never retrieved": the error is logged where it happened.
    if not fut.cancelled():
        fut.exception()


class _Writer:
    """The dedicated thread that owns the sqlite3 connection and group-commits queued operations."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        loop: asyncio.AbstractEventLoop,
        deliver: _Deliver,
        max_batch: int,
    ) -> None:
        self._conn = conn
        self._path = path
        self._loop = loop
        self._deliver = deliver
        self._max_batch = max_batch
        # The loop hands over lists of operations (one list per loop iteration, see Outbox._submit).
        self.queue: queue.SimpleQueue[list[_Op]] = queue.SimpleQueue()
        self._retry: list[_Delete] = []
        self.thread = threading.Thread(target=self._run, name=f"outbox-writer:{path.name}", daemon=True)

    def _run(self) -> None:
        closing: _Close | None = None
        while closing is None:
            ops = self.queue.get()
            rows = sum(len(op.rows) for op in ops if isinstance(op, _Insert))
            while rows < self._max_batch:
                try:
                    more = self.queue.get_nowait()
                except queue.Empty:
                    break
                ops.extend(more)
                rows += sum(len(op.rows) for op in more if isinstance(op, _Insert))
            try:
                closing = self._process(ops)
            except Exception as err:
                # A bug here must not leave puts waiting forever: fail what this batch carried.
                log.exception("outbox writer failed path=%s", self._path)
                closing = self._fail_all(ops, err)
        try:
            self._conn.close()
        except sqlite3.Error as err:
            log.error("outbox close failed path=%s error=%s", self._path, err)
        self._post(_BatchOutcome(resolutions=[(closing.future, None, None)]))

    def _fail_all(self, ops: list[_Op], err: Exception) -> _Close | None:
        self._rollback()
        error = OutboxUnavailableError(f"outbox {self._path}: internal error: {err!r}")
        outcome = _BatchOutcome(write_error=error)
        closing: _Close | None = None
        for op in ops:
            if isinstance(op, _Insert):
                outcome.failed.extend(_failed_rows(op))
                outcome.resolutions.append((op.future, None, error))
            elif isinstance(op, _Fetch | _Page | _Next):
                if isinstance(op, _Page):
                    outcome.pages.append((op, []))
                outcome.resolutions.append((op.future, None, error))
            elif isinstance(op, _Close):
                closing = op
        self._post(outcome)
        return closing

    def _process(self, ops: list[_Op]) -> _Close | None:
        inserts = [op for op in ops if isinstance(op, _Insert)]
        deletes = self._retry + [op for op in ops if isinstance(op, _Delete)]
        self._retry = []
        outcome = _BatchOutcome()
        if inserts or deletes:
            self._write(inserts, deletes, outcome)
        # Reads after the writes: a page or fetch sees every row put before it was asked for.
        for op in ops:
            if isinstance(op, _Fetch):
                self._fetch(op, outcome)
            elif isinstance(op, _Page):
                self._page(op, outcome)
            elif isinstance(op, _Next):
                self._next(op, outcome)
        self._post(outcome)
        closes = [op for op in ops if isinstance(op, _Close)]
        return closes[0] if closes else None

    def _write(self, inserts: list[_Insert], deletes: list[_Delete], outcome: _BatchOutcome) -> None:
        try:
            self._transaction(inserts, deletes)
        except sqlite3.Error as err:
            self._rollback()
            error = _unavailable(self._path, "commit", err)
            log.error("outbox commit failed path=%s rows=%d error=%s", self._path, len(inserts), err)
            outcome.write_error = error
            for op in inserts:
                outcome.failed.extend(_failed_rows(op))
                outcome.resolutions.append((op.future, None, error))
            self._retry_deletes(deletes)
            return
        if inserts:
            outcome.committed_upto = max(int(op.rows[-1][0]) for op in inserts)
        outcome.resolutions.extend((op.future, None, None) for op in inserts)

    def _transaction(self, inserts: list[_Insert], deletes: list[_Delete]) -> None:
        conn = self._conn
        rows = [row for ins in inserts for row in ins.rows]
        if not deletes and len(rows) <= _ROWS_PER_INSERT and not conn.in_transaction:
            # One statement is a transaction of its own (autocommit): the whole commit is one
            # SQLite call, so the thread gives the GIL back and takes it again once, not per row
            # (each take waits for the busy event loop and wakes a thread across cores).
            _insert_rows(conn, rows)
            return
        conn.execute("BEGIN IMMEDIATE")
        for start in range(0, len(rows), _ROWS_PER_INSERT):
            _insert_rows(conn, rows[start : start + _ROWS_PER_INSERT])
        counts: dict[tuple[str, int], int] = {}
        for d in deletes:
            if d.ids:
                conn.executemany("DELETE FROM outbox WHERE id = ?", ((i,) for i in d.ids))
            for key, n in d.counts.items():
                counts[key] = counts.get(key, 0) + n
        if counts:
            conn.executemany(_COUNT, ((k, p, n) for (k, p), n in counts.items()))
        conn.execute("COMMIT")

    def _retry_deletes(self, deletes: list[_Delete]) -> None:
        # Deleting frees space, so on a full disk try the deletes alone before giving up on them.
        if not deletes:
            return
        try:
            self._transaction([], deletes)
        except sqlite3.Error as err:
            self._rollback()
            log.error("outbox delete failed, retried next batch path=%s error=%s", self._path, err)
            self._retry = deletes

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error as err:
                log.error("outbox rollback failed path=%s error=%s", self._path, err)

    def _fetch(self, op: _Fetch, outcome: _BatchOutcome) -> None:
        found: dict[int, Stored] = {}
        try:
            for start in range(0, len(op.ids), _FETCH_CHUNK):
                chunk = op.ids[start : start + _FETCH_CHUNK]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT {_SELECT_COLUMNS} FROM outbox WHERE id IN ({marks})"
                for row in self._conn.execute(sql, chunk):
                    stored = _decode_row(row)
                    found[stored.row_id] = stored
        except sqlite3.Error as err:
            outcome.resolutions.append((op.future, None, _unavailable(self._path, "read", err)))
            return
        result = [found[i] for i in op.ids if i in found]
        outcome.resolutions.append((op.future, result, None))

    def _page(self, op: _Page, outcome: _BatchOutcome) -> None:
        try:
            rows: list[_PageRow] = self._conn.execute(_SELECT_PAGE, (int(op.priority), op.after, op.limit)).fetchall()
        except sqlite3.Error as err:
            log.error("outbox page read failed path=%s priority=%s error=%s", self._path, op.priority.name, err)
            outcome.pages.append((op, []))
            outcome.resolutions.append((op.future, None, _unavailable(self._path, "read", err)))
            return
        outcome.pages.append((op, rows))
        outcome.resolutions.append((op.future, len(rows), None))

    def _next(self, op: _Next, outcome: _BatchOutcome) -> None:
        try:
            (n,) = self._conn.execute(_NEXT, (op.name, op.at_least)).fetchone()
            if self._conn.in_transaction:  # RETURNING keeps the statement's transaction open
                self._conn.execute("COMMIT")
        except sqlite3.Error as err:
            self._rollback()
            outcome.resolutions.append((op.future, None, _unavailable(self._path, "commit", err)))
            return
        outcome.resolutions.append((op.future, int(n), None))

    def _post(self, outcome: _BatchOutcome) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, outcome)
        except RuntimeError:
            # The loop is closed: nobody is left to wake, the data is already committed.
            log.warning("outbox loop closed before a batch outcome was delivered path=%s", self._path)


class _Deliver:
    """Callable handed to the writer: applies a batch outcome on the event loop."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox

    def __call__(self, outcome: _BatchOutcome) -> None:
        self._outbox._apply_outcome(outcome)


class Outbox:
    """Durable, bounded, priority-ordered outbox over one SQLite file in WAL mode.

    Use `await Outbox.open(path, max_bytes)`; see the module docstring for the design.
    """

    def __init__(self, path: Path, max_bytes: int, loaded: _Loaded, max_batch: int, page_rows: int) -> None:
        self._path = path
        self._max_bytes = max_bytes
        self._page_rows = page_rows
        self._low_water = max(1, page_rows // 4)
        self._loop = asyncio.get_running_loop()
        self._classes: dict[Priority, _Class] = {p: _Class(p) for p in Priority}
        self._inflight: dict[int, _Meta] = {}
        self._bytes = 0
        self._next_id = 1
        self._committed_upto = 0
        self._commits = 0  # bumped with every commit of new rows: lets `take` tell if it missed one
        self._counters: dict[str, dict[Priority, int]] = {
            k: dict.fromkeys(Priority, 0) for k in (_KIND_EVICTED, _KIND_EXPIRED, _KIND_REJECTED)
        }
        self._available = asyncio.Event()
        # Held by a put only while it waits for a page (eviction past a page): keeps ids, pages
        # and evictions of concurrent puts in order. Uncontended, entering it does not yield.
        self._admission = asyncio.Lock()
        self._staged: list[_Op] = []
        self._closed = False
        self._healthy = True
        self._load(loaded)
        self._writer = _Writer(loaded.conn, path, self._loop, _Deliver(self), max_batch)
        self._writer.thread.start()

    @classmethod
    async def open(
        cls,
        path: Path | str,
        max_bytes: int,
        *,
        synchronous: SynchronousMode = "NORMAL",
        max_batch: int = 2048,
        page_rows: int = DEFAULT_PAGE_ROWS,
    ) -> Outbox:
        """Open (creating if needed) the outbox file; unacked rows of a previous run are pending again.

        `page_rows` bounds the rows per priority class whose index the loop keeps in memory.
        """
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        if page_rows < 1:
            raise ValueError(f"page_rows must be >= 1, got {page_rows}")
        p = Path(path)
        loaded = await asyncio.to_thread(_open_db, p, synchronous, time.time())
        outbox = cls(p, max_bytes, loaded, max_batch, page_rows)
        if loaded.expired:
            log.info(
                "outbox dropped expired rows path=%s counts=%s",
                p,
                {prio.name: n for prio, n in loaded.expired.items()},
            )
        log.info(
            "outbox opened path=%s depth=%d bytes=%d expired_on_open=%d synchronous=%s",
            p,
            outbox.depth,
            outbox.bytes,
            sum(loaded.expired.values()),
            synchronous,
        )
        return outbox

    def _load(self, loaded: _Loaded) -> None:
        for prio, count, nbytes in loaded.classes:
            cls = self._classes[Priority(prio)]
            cls.count, cls.nbytes = count, nbytes  # all in the file only: cursor 0, empty page
            self._bytes += nbytes
        self._next_id = loaded.max_id + 1
        self._committed_upto = loaded.max_id
        for kind, prio, n in loaded.counters:
            if kind in self._counters:
                self._counters[kind][Priority(prio)] = n
        if loaded.max_id:
            self._available.set()

    # ---- stats -------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def depth(self) -> int:
        """Rows stored and not acked yet (pending and in flight)."""
        return len(self._inflight) + sum(c.count for c in self._classes.values())

    @property
    def bytes(self) -> int:
        """Sum of topic + payload bytes of the rows counted in `depth`."""
        return self._bytes

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def indexed_rows(self) -> int:
        """Rows whose index entry is held in memory (pages + in flight): bounded, not the depth."""
        return len(self._inflight) + sum(len(c.page) for c in self._classes.values())

    @property
    def available(self) -> bool:
        """False after a failed commit (disk full, I/O error) until a later commit succeeds."""
        return self._healthy and not self._closed

    @property
    def evicted(self) -> dict[Priority, int]:
        """Rows evicted to make room, by class (persisted in the file: totals since it was created)."""
        return dict(self._counters[_KIND_EVICTED])

    @property
    def expired(self) -> dict[Priority, int]:
        """Rows dropped unsent because their `expires_at` passed, by class (persisted)."""
        return dict(self._counters[_KIND_EXPIRED])

    @property
    def rejected(self) -> dict[Priority, int]:
        """Puts refused with OutboxFullError, by class (persisted)."""
        return dict(self._counters[_KIND_REJECTED])

    # ---- producing ---------------------------------------------------------------------------

    async def next_sequence(self, name: str, at_least: int = 0) -> int:
        """The next number of the sequence `name`, committed before it is returned: greater than
        every number it gave before (in this process or an earlier one on this file), and at
        least `at_least`."""
        self._check_open()
        fut: asyncio.Future[int] = self._loop.create_future()
        self._submit(_Next(name, at_least, fut))
        return await fut

    async def put(self, msg: OutMessage) -> None:
        """Store one message; returns once its row is committed (durable accept)."""
        await self.put_many((msg,))

    async def put_many(self, msgs: Iterable[OutMessage]) -> None:
        """Store several messages in one commit.

        Raises OutboxFullError if some could not be stored (after committing the others), and
        OutboxUnavailableError if the commit failed (none of them is stored then).
        """
        self._check_open()
        now = time.time()
        rows: list[tuple[object, ...]] = []
        rejected: list[str] = []
        commits: list[asyncio.Future[None]] = []
        try:
            async with self._admission:
                for msg in msgs:
                    verdict = self._admit(msg, now, rejected)
                    empty_reads = 0
                    while isinstance(verdict, _NeedPage):
                        # Hand over what is admitted so far first: the page must see those rows.
                        if rows:
                            commits.append(self._insert(rows))
                            rows = []
                        empty_reads = 0 if await self._page_in(verdict.priority) else empty_reads + 1
                        if empty_reads > 1:
                            raise OutboxUnavailableError(
                                f"outbox {self._path}: {verdict.priority.name} rows counted as pending are"
                                " missing from the file; fix: restart the node (open re-reads the totals)"
                            )
                        verdict = self._admit(msg, now, rejected)
                    if verdict is not None:
                        rows.append(verdict)
        except BaseException:
            for fut in commits:
                fut.add_done_callback(_retrieve)  # rows handed over are committed (or logged) anyway
            raise
        if rows:
            commits.append(self._insert(rows))
        for fut in commits:
            await fut
        if rejected:
            raise OutboxFullError("; ".join(rejected))

    def _insert(self, rows: list[tuple[object, ...]]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self._loop.create_future()
        self._submit(_Insert(rows, fut))
        return fut

    def _admit(self, msg: OutMessage, now: float, rejected: list[str]) -> tuple[object, ...] | _NeedPage | None:
        if msg.qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {msg.qos}")
        prio = msg.priority
        if prio.__class__ is not Priority:  # an int from a caller: the enum call costs ~1 µs, skip it
            prio = Priority(prio)
        nbytes = _message_size(msg)
        if self._bytes + nbytes > self._max_bytes:
            verdict = self._make_room(prio, nbytes)
            if isinstance(verdict, _NeedPage):
                return verdict
            if verdict is not None:
                self._reject(msg, prio, nbytes, verdict, rejected)
                return None
        row_id = self._next_id
        self._next_id += 1
        cls = self._classes[prio]
        if cls.count == len(cls.page) and cls.paging is None and len(cls.page) < self._page_rows:
            # Nothing of this class waits in the file only: the page stays a true prefix.
            cls.page[row_id] = _Meta(prio, nbytes, msg.expires_at)
            cls.cursor = row_id
        cls.count += 1
        cls.nbytes += nbytes
        self._bytes += nbytes
        return _encode_row(row_id, msg, nbytes, now)

    def _reject(self, msg: OutMessage, prio: Priority, nbytes: int, reason: str, rejected: list[str]) -> None:
        self._count(_KIND_REJECTED, {prio: 1}, [])
        log.warning(
            "outbox full, message rejected path=%s priority=%s msg_id=%s nbytes=%d bytes=%d max_bytes=%d",
            self._path,
            prio.name,
            msg.msg_id,
            nbytes,
            self._bytes,
            self._max_bytes,
        )
        rejected.append(f"outbox {self._path} full: {prio.name} message {msg.msg_id}: {reason}")

    def _make_room(self, prio: Priority, nbytes: int) -> str | _NeedPage | None:
        """Evict lower-or-equal priority rows, oldest first, until `nbytes` fits; else say why not.

        A message never evicts a row of a higher priority than its own, CONTROL rows are never
        evicted, and in-flight rows are never evicted (they may be acked any moment). Returns
        `_NeedPage` (having evicted nothing) when the victims run past a class's in-memory page.
        """
        need = self._bytes + nbytes - self._max_bytes
        victims = [self._classes[p] for p in _VICTIMS[prio]]
        evictable = sum(c.nbytes for c in victims)
        if evictable < need:
            return (
                f"needs {nbytes} B, {self._max_bytes - self._bytes} B free of {self._max_bytes} B and only"
                f" {evictable} B evictable (pending rows of priority {prio.name} or lower, never CONTROL)"
            )
        shortfall = self._plan(victims, need)
        if shortfall is not None:
            return shortfall
        ids: list[int] = []
        counts: dict[Priority, int] = {}
        for cls in victims:
            page = cls.page
            while need > 0 and page:
                row_id, meta = page.popitem(last=False)
                cls.count -= 1
                cls.nbytes -= meta.nbytes
                self._bytes -= meta.nbytes
                need -= meta.nbytes
                ids.append(row_id)
                counts[cls.priority] = counts.get(cls.priority, 0) + 1
            if need <= 0:
                break
        log.info("outbox evicted rows path=%s counts=%s", self._path, {p.name: n for p, n in counts.items()})
        self._count(_KIND_EVICTED, counts, ids)
        return None

    @staticmethod
    def _plan(victims: list[_Class], need: int) -> _NeedPage | None:
        """Whether the in-memory pages hold enough victims; else the class whose next page is needed."""
        for cls in victims:
            for meta in cls.page.values():
                need -= meta.nbytes
                if need <= 0:
                    return None
            if cls.in_file_only:
                return _NeedPage(cls.priority)
        return None  # unreachable while the totals are right: evictable >= need was checked

    def _count(self, kind: str, counts: dict[Priority, int], ids: list[int]) -> None:
        for p, n in counts.items():
            self._counters[kind][p] += n
        self._submit(_Delete(ids, {(kind, int(p)): n for p, n in counts.items()}))

    # ---- paging ------------------------------------------------------------------------------

    def _request_page(self, cls: _Class) -> asyncio.Future[int]:
        """Ask the writer for the next page of `cls` (one read in flight per class at most)."""
        if cls.paging is not None:
            return cls.paging
        self._check_open()
        fut: asyncio.Future[int] = self._loop.create_future()
        fut.add_done_callback(_retrieve)
        cls.paging = fut
        self._submit(_Page(cls.priority, cls.cursor, self._page_rows, fut))
        return fut

    async def _page_in(self, prio: Priority) -> int:
        """Read the next page of `prio` into memory; returns how many rows it brought."""
        # Shielded: a cancelled taker must not cancel a read that others may be waiting on too.
        return await asyncio.shield(self._request_page(self._classes[prio]))

    def _apply_page(self, op: _Page, rows: list[_PageRow]) -> None:
        cls = self._classes[op.priority]
        if cls.paging is op.future:
            cls.paging = None
        page = cls.page
        prio = cls.priority
        for row_id, nbytes, expires_at in rows:
            if row_id > cls.cursor:  # rows at or below the cursor are known already
                page[row_id] = _Meta(prio, nbytes, expires_at)
                cls.cursor = row_id
        if rows:
            self._available.set()

    # ---- consuming ---------------------------------------------------------------------------

    async def take(self, limit: int, *, max_priority: Priority = Priority.SAMPLES, wait: bool = True) -> list[Stored]:
        """Wait until rows are pending, then hand out up to `limit`, by priority then age.

        Only classes up to `max_priority` (numerically) are considered. With `wait=False` an empty
        list is returned at once when nothing is pending. Rows handed out are in flight: not
        handed out again until `ack`ed (deleted) or `release_inflight()` puts them back (e.g.
        after a disconnect). A take cancelled while it fetches puts its rows back itself.
        """
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        while True:
            self._check_open()
            ids, short = self._select(limit, max_priority, time.time())
            if ids:
                rows = await self._fetch(ids)
                if rows:
                    return rows
                continue
            if short is not None:
                commits = self._commits
                if await self._page_in(short) or self._commits != commits:
                    continue
                # The rows of that class are not committed yet: their commit wakes us below.
            if not wait:
                return []
            self._available.clear()
            await self._available.wait()

    def _select(self, limit: int, max_priority: Priority, now: float) -> tuple[list[int], Priority | None]:
        """Move up to `limit` committed rows from the pages to in-flight, by priority then age.

        Also returns the class whose page ran out while more of it waits in the file: no lower
        class may be served before it, so the caller reads its next page first.
        """
        chosen: list[int] = []
        expired: dict[Priority, int] = {}
        expired_ids: list[int] = []
        short: Priority | None = None
        committed = self._committed_upto
        inflight = self._inflight
        for cls in self._classes.values():
            if cls.priority > max_priority:
                break
            page = cls.page
            while page and len(chosen) < limit:
                row_id = next(iter(page))
                if row_id > committed:
                    break
                meta = page.pop(row_id)
                cls.count -= 1
                cls.nbytes -= meta.nbytes
                if meta.expires_at is not None and meta.expires_at <= now:
                    self._bytes -= meta.nbytes
                    expired_ids.append(row_id)
                    expired[cls.priority] = expired.get(cls.priority, 0) + 1
                    continue
                inflight[row_id] = meta
                chosen.append(row_id)
            if len(page) < self._low_water and cls.in_file_only:
                self._request_page(cls)  # read ahead, so the drain rarely waits for a page
                if not page:
                    short = cls.priority
                    break
            if len(chosen) >= limit:
                break
        if expired_ids:
            self._count(_KIND_EXPIRED, expired, expired_ids)
        return chosen, short

    async def _fetch(self, ids: list[int]) -> list[Stored]:
        fut: asyncio.Future[list[Stored]] = self._loop.create_future()
        self._submit(_Fetch(ids, fut))
        try:
            rows = await fut
        except BaseException:
            # Cancelled (or failed) between choosing and fetching: put the rows back so that
            # they are not stuck in flight with nobody to ack them.
            self._return_to_pending(ids)
            raise
        if len(rows) != len(ids):
            found = {r.row_id for r in rows}
            missing = [i for i in ids if i not in found]
            log.error("outbox rows vanished from the file path=%s ids=%s", self._path, missing[:10])
            for i in missing:
                meta = self._inflight.pop(i, None)
                if meta is not None:
                    self._bytes -= meta.nbytes
        return rows

    def ack(self, row_ids: Iterable[int]) -> None:
        """The broker acknowledged these rows: delete them (batched, durable with the next commit).

        A crash before that commit re-sends them, which `msg_id` makes recognisable downstream.
        """
        ids: list[int] = []
        for row_id in row_ids:
            meta = self._inflight.pop(row_id, None) or self._pop_pending(row_id)
            if meta is None:
                continue
            self._bytes -= meta.nbytes
            ids.append(row_id)
        if ids and not self._closed:
            self._submit(_Delete(ids))

    def release_inflight(self) -> int:
        """Make every in-flight row pending again (e.g. the link disconnected); returns how many."""
        return self._return_to_pending(list(self._inflight))

    def _return_to_pending(self, ids: list[int]) -> int:
        touched: set[Priority] = set()
        moved = 0
        for row_id in ids:
            meta = self._inflight.pop(row_id, None)
            if meta is None:
                continue
            moved += 1
            # Back into the page: its id is below the cursor (it came from the page).
            cls = self._classes[meta.priority]
            cls.page[row_id] = meta
            cls.count += 1
            cls.nbytes += meta.nbytes
            touched.add(meta.priority)
        for prio in touched:
            # Re-sort by row id (age): returned rows are older than the rows still pending.
            cls = self._classes[prio]
            cls.page = OrderedDict(sorted(cls.page.items()))
        if touched:
            self._available.set()
        return moved

    def drop_expired(self, now: float) -> int:
        """Delete pending rows in memory whose `expires_at` is past (counted in `expired`).

        Returns how many. Rows still only in the file are checked when paged in and at open.
        """
        counts: dict[Priority, int] = {}
        ids: list[int] = []
        for prio, cls in self._classes.items():
            page = cls.page
            dead = [i for i, m in page.items() if m.expires_at is not None and m.expires_at <= now]
            for row_id in dead:
                meta = page.pop(row_id)
                cls.count -= 1
                cls.nbytes -= meta.nbytes
                self._bytes -= meta.nbytes
            if dead:
                counts[prio] = len(dead)
                ids.extend(dead)
        if ids:
            log.info(
                "outbox dropped expired rows path=%s counts=%s",
                self._path,
                {p.name: n for p, n in counts.items()},
            )
            self._count(_KIND_EXPIRED, counts, ids)
        return len(ids)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Commit everything queued (puts, acks, counters), then close the file."""
        if self._closed:
            return
        self._closed = True
        self._available.set()  # wake takers: they raise OutboxClosedError
        fut: asyncio.Future[None] = self._loop.create_future()
        self._submit(_Close(fut))
        self._flush_staged()
        await fut
        await asyncio.to_thread(self._writer.thread.join)
        log.info("outbox closed path=%s depth=%d bytes=%d", self._path, self.depth, self._bytes)

    def _submit(self, op: _Op) -> None:
        """Stage an operation; everything staged in one loop iteration reaches the writer together.

        One hand-over per iteration instead of one per put: waking the writer thread costs a GIL
        switch each time. Staging keeps the order of operations (an eviction's delete must follow
        the insert of the row it deletes).
        """
        self._staged.append(op)
        if len(self._staged) == 1:
            self._loop.call_soon(self._flush_staged)

    def _flush_staged(self) -> None:
        if self._staged:
            staged, self._staged = self._staged, []
            self._writer.queue.put(staged)

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxClosedError(f"outbox {self._path} is closed")

    def _apply_outcome(self, outcome: _BatchOutcome) -> None:
        if outcome.failed:
            self._forget(outcome.failed)
        if outcome.write_error is not None:
            self._healthy = False
        elif outcome.committed_upto:
            self._healthy = True
        if outcome.committed_upto > self._committed_upto:
            self._committed_upto = outcome.committed_upto
            self._commits += 1
            self._available.set()
        for op, rows in outcome.pages:
            self._apply_page(op, rows)
        for fut, result, error in outcome.resolutions:
            if fut.done():
                continue  # the awaiting put was cancelled; its rows are committed anyway
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

    def _forget(self, failed: list[tuple[int, int, int]]) -> None:
        """Drop the bookkeeping of rows whose insert failed (they are not in the file)."""
        for row_id, prio, nbytes in failed:
            cls = self._classes[Priority(prio)]
            meta = cls.page.pop(row_id, None)
            if meta is None and row_id <= cls.cursor:
                continue  # it was in the page and is gone already (evicted): nothing is counted
            cls.count -= 1
            cls.nbytes -= nbytes
            self._bytes -= nbytes

    def _pop_pending(self, row_id: int) -> _Meta | None:
        for cls in self._classes.values():
            meta = cls.page.pop(row_id, None)
            if meta is not None:
                cls.count -= 1
                cls.nbytes -= meta.nbytes
                return meta
        return None
