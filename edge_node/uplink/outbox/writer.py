"""The outbox's writer thread: the only code that touches the sqlite3 connection.

Why the stdlib `sqlite3` in one dedicated writer thread rather than aiosqlite, and how it commits:

* Group commit (docs/traps.md #4). Operations (inserts, acked deletes, evictions, fetches) made
  during one event-loop iteration are handed to the writer thread as one list (`Writer.submit`);
  the thread takes everything that queued up while its previous transaction ran (up to
  `max_batch` rows) and commits it as ONE transaction, then wakes every waiting `put` with a single
  `call_soon_threadsafe`. The batch size adapts to the load by itself: an idle outbox commits a row
  at once (no artificial linger), a busy one hundreds per commit. aiosqlite would cost a thread hop
  each way per awaited call (≈ 60 µs) and hide the queue we need to batch over.
* Order. The loop assigns row ids itself and queues inserts, acks and evictions in the order it
  made them, so one thread applying them in queue order never deletes a row before inserting it.
* Writes before reads within a batch: a page or fetch sees every row put before it was asked for.
* What comes back (`BatchOutcome`) is applied on the loop by the callable the outbox hands over:
  the highest committed id, the rows whose insert failed, the pages read, and the futures to
  resolve. A failed commit fails the puts it carried; its deletes are retried alone (deleting frees
  space on a full disk) and else with the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_node.errors import OutboxUnavailableError
from edge_node.uplink.message import Priority, Stored
from edge_node.uplink.outbox.sqlite import (
    ROWS_PER_INSERT,
    PageRow,
    Row,
    add_counts,
    delete_rows,
    fetch_rows,
    insert_rows,
    next_in_sequence,
    read_page,
    row_key,
    unavailable,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Insert:
    rows: list[Row]
    future: asyncio.Future[None]


@dataclass(slots=True)
class Delete:
    """Rows to delete (acked, evicted, expired), and the counters to add: {(kind, priority): n}."""

    ids: list[int]
    counts: dict[tuple[str, int], int] = field(default_factory=dict)


@dataclass(slots=True)
class Fetch:
    ids: list[int]
    future: asyncio.Future[list[Stored]]


@dataclass(slots=True)
class PageRead:
    priority: Priority
    after: int
    limit: int
    future: asyncio.Future[int]


@dataclass(slots=True)
class Close:
    future: asyncio.Future[None]


@dataclass(slots=True)
class NextSequence:
    name: str
    at_least: int
    future: asyncio.Future[int]


Op = Insert | Delete | Fetch | PageRead | Close | NextSequence


@dataclass(slots=True)
class BatchOutcome:
    """What the writer thread reports back to the loop after one group commit."""

    committed_upto: int = 0
    failed: list[tuple[int, int, int]] = field(default_factory=list)  # (id, priority, nbytes)
    write_error: OutboxUnavailableError | None = None
    pages: list[tuple[PageRead, list[PageRow]]] = field(default_factory=list)
    # (future, result, error): Any because the futures carry different result types.
    resolutions: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = field(default_factory=list)


class Writer:
    """The dedicated thread that owns the sqlite3 connection and group-commits queued operations."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[BatchOutcome], None],
        max_batch: int,
    ) -> None:
        self._conn = conn
        self._path = path
        self._loop = loop
        self._deliver = deliver
        self._max_batch = max_batch
        # The loop hands over lists of operations (one list per loop iteration, see `submit`).
        self.queue: queue.SimpleQueue[list[Op]] = queue.SimpleQueue()
        self._staged: list[Op] = []
        self._retry: list[Delete] = []
        self.thread = threading.Thread(target=self._run, name=f"outbox-writer:{path.name}", daemon=True)

    # ---- the loop's side ------------------------------------------------------------------------

    def submit(self, op: Op) -> None:
        """Stage an operation; everything staged in one loop iteration reaches the thread together.

        One hand-over per iteration instead of one per put: waking the writer thread costs a GIL
        switch each time. Staging keeps the order of operations (an eviction's delete must follow
        the insert of the row it deletes).
        """
        self._staged.append(op)
        if len(self._staged) == 1:
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Hand what is staged to the thread now (also called by `close` before it waits)."""
        if self._staged:
            staged, self._staged = self._staged, []
            self.queue.put(staged)

    # ---- the thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        closing: Close | None = None
        while closing is None:
            ops = self.queue.get()
            rows = sum(len(op.rows) for op in ops if isinstance(op, Insert))
            while rows < self._max_batch:
                try:
                    more = self.queue.get_nowait()
                except queue.Empty:
                    break
                ops.extend(more)
                rows += sum(len(op.rows) for op in more if isinstance(op, Insert))
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
        self._post(BatchOutcome(resolutions=[(closing.future, None, None)]))

    def _fail_all(self, ops: list[Op], err: Exception) -> Close | None:
        self._rollback()
        error = OutboxUnavailableError(f"outbox {self._path}: internal error: {err!r}")
        outcome = BatchOutcome(write_error=error)
        closing: Close | None = None
        for op in ops:
            if isinstance(op, Insert):
                outcome.failed.extend(row_key(r) for r in op.rows)
                outcome.resolutions.append((op.future, None, error))
            elif isinstance(op, Fetch | PageRead | NextSequence):
                if isinstance(op, PageRead):
                    outcome.pages.append((op, []))
                outcome.resolutions.append((op.future, None, error))
            elif isinstance(op, Close):
                closing = op
        self._post(outcome)
        return closing

    def _process(self, ops: list[Op]) -> Close | None:
        inserts = [op for op in ops if isinstance(op, Insert)]
        deletes = self._retry + [op for op in ops if isinstance(op, Delete)]
        self._retry = []
        outcome = BatchOutcome()
        if inserts or deletes:
            self._write(inserts, deletes, outcome)
        # Reads after the writes: a page or fetch sees every row put before it was asked for.
        for op in ops:
            if isinstance(op, Fetch):
                self._fetch(op, outcome)
            elif isinstance(op, PageRead):
                self._page(op, outcome)
            elif isinstance(op, NextSequence):
                self._next(op, outcome)
        self._post(outcome)
        closes = [op for op in ops if isinstance(op, Close)]
        return closes[0] if closes else None

    def _write(self, inserts: list[Insert], deletes: list[Delete], outcome: BatchOutcome) -> None:
        try:
            self._transaction(inserts, deletes)
        except sqlite3.Error as err:
            self._rollback()
            error = unavailable(self._path, "commit", err)
            log.error("outbox commit failed path=%s rows=%d error=%s", self._path, len(inserts), err)
            outcome.write_error = error
            for op in inserts:
                outcome.failed.extend(row_key(r) for r in op.rows)
                outcome.resolutions.append((op.future, None, error))
            self._retry_deletes(deletes)
            return
        if inserts:
            outcome.committed_upto = max(int(op.rows[-1][0]) for op in inserts)
        outcome.resolutions.extend((op.future, None, None) for op in inserts)

    def _transaction(self, inserts: list[Insert], deletes: list[Delete]) -> None:
        conn = self._conn
        rows = [row for ins in inserts for row in ins.rows]
        if not deletes and len(rows) <= ROWS_PER_INSERT and not conn.in_transaction:
            # One statement is a transaction of its own (autocommit): the whole commit is one
            # SQLite call, so the thread gives the GIL back and takes it again once, not per row
            # (each take waits for the busy event loop and wakes a thread across cores).
            insert_rows(conn, rows)
            return
        conn.execute("BEGIN IMMEDIATE")
        for start in range(0, len(rows), ROWS_PER_INSERT):
            insert_rows(conn, rows[start : start + ROWS_PER_INSERT])
        counts: dict[tuple[str, int], int] = {}
        for d in deletes:
            if d.ids:
                delete_rows(conn, d.ids)
            for key, n in d.counts.items():
                counts[key] = counts.get(key, 0) + n
        if counts:
            add_counts(conn, counts)
        conn.execute("COMMIT")

    def _retry_deletes(self, deletes: list[Delete]) -> None:
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

    def _fetch(self, op: Fetch, outcome: BatchOutcome) -> None:
        try:
            result = fetch_rows(self._conn, op.ids)
        except sqlite3.Error as err:
            outcome.resolutions.append((op.future, None, unavailable(self._path, "read", err)))
            return
        outcome.resolutions.append((op.future, result, None))

    def _page(self, op: PageRead, outcome: BatchOutcome) -> None:
        try:
            rows = read_page(self._conn, op.priority, op.after, op.limit)
        except sqlite3.Error as err:
            log.error("outbox page read failed path=%s priority=%s error=%s", self._path, op.priority.name, err)
            outcome.pages.append((op, []))
            outcome.resolutions.append((op.future, None, unavailable(self._path, "read", err)))
            return
        outcome.pages.append((op, rows))
        outcome.resolutions.append((op.future, len(rows), None))

    def _next(self, op: NextSequence, outcome: BatchOutcome) -> None:
        try:
            n = next_in_sequence(self._conn, op.name, op.at_least)
        except sqlite3.Error as err:
            self._rollback()
            outcome.resolutions.append((op.future, None, unavailable(self._path, "commit", err)))
            return
        outcome.resolutions.append((op.future, n, None))

    def _post(self, outcome: BatchOutcome) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, outcome)
        except RuntimeError:
            # The loop is closed: nobody is left to wake, the data is already committed.
            log.warning("outbox loop closed before a batch outcome was delivered path=%s", self._path)
