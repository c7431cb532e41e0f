"""Durable SQLite outbox: every outbound message of the edge node is committed here first.

A message leaves the outbox only when it has arrived: by default when the cloud confirms it stored
it (`confirm`, for the messages that carry a `seq`, see sent.py), else when the broker acknowledged
it (the link calls `ack`). So a broker outage or restart, a cut link, a gateway's full queue or
`kill -9` loses nothing that `put` had returned for: `put` returns once its row is committed (the
group commit of writer.py), and a row is handed to `take` only once committed.

This module is the async face over three parts: `index.py` (what the loop knows of the rows: pages,
eviction, expiry), `writer.py` (the thread that group-commits to the file) and `sqlite.py` (the
file itself). Operations made in one loop iteration are staged and handed to the writer together.

Thread safety: every public method must be called from the event loop thread that opened the
outbox; only the writer thread touches the sqlite3 connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edge_node.errors import OutboxClosedError, OutboxFullError, OutboxUnavailableError
from edge_node.uplink.message import OutMessage, Priority, Stored, message_size
from edge_node.uplink.outbox.index import DEFAULT_PAGE_ROWS, Index, NeedPage, PageClass
from edge_node.uplink.outbox.sent import Confirming, Delivery, SentRows
from edge_node.uplink.outbox.sequences import Sequences
from edge_node.uplink.outbox.sqlite import (
    KIND_EVICTED,
    KIND_EXPIRED,
    KIND_REJECTED,
    Loaded,
    Row,
    SynchronousMode,
    encode_row,
    open_db,
)
from edge_node.uplink.outbox.writer import (
    BatchOutcome,
    Close,
    Delete,
    Fetch,
    Insert,
    PageRead,
    Writer,
)

log = logging.getLogger(__name__)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # A future nobody awaits (a prefetch, a failed put's earlier commits) must not end as
    # "exception was never retrieved": the error is logged where it happened.
    if not fut.cancelled():
        fut.exception()


class Outbox:
    """Durable, bounded, priority-ordered outbox over one SQLite file in WAL mode.

    Use `await Outbox.open(path, max_bytes)`; see the module docstrings of this package for the design.
    """

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        loaded: Loaded,
        max_batch: int,
        page_rows: int,
        confirming: Confirming | None,
    ) -> None:
        self._path = path
        self._page_rows = page_rows
        self._loop = asyncio.get_running_loop()
        self._index = Index(path, max_bytes, page_rows, drop=self._count, want_page=self._request_page)
        if confirming is not None:
            self._index.sent = SentRows(confirming)
        self.epoch = format(loaded.epoch, "x")
        self._commits = 0  # bumped with every commit of new rows: lets `take` tell if it missed one
        self._counters = loaded.counters  # persisted: totals since the file was created
        self._available = asyncio.Event()
        # Held by a put only while it waits for a page (eviction past a page): keeps ids, pages
        # and evictions of concurrent puts in order. Uncontended, entering it does not yield.
        self._admission = asyncio.Lock()
        self._closed = False
        self._healthy = True
        self._index.load(loaded.classes, loaded.max_id)
        if loaded.max_id:
            self._available.set()
        self._writer = Writer(loaded.conn, path, self._loop, self._apply_outcome, max_batch)
        self._writer.thread.start()
        self._sequences = Sequences(path, self._writer, self._loop, loaded.seq_reserved)
        self._sequences.start()

    @classmethod
    async def open(
        cls,
        path: Path | str,
        max_bytes: int,
        *,
        synchronous: SynchronousMode = "NORMAL",
        max_batch: int = 2048,
        page_rows: int = DEFAULT_PAGE_ROWS,
        confirming: Confirming | None = None,
    ) -> Outbox:
        """Open (creating if needed) the outbox file; rows not done in a previous run are pending again.

        `page_rows` bounds the rows per priority class whose index the loop keeps in memory.
        `confirming`: rows with a seq wait for the cloud's confirmation after their PUBACK (see
        sent.py); None deletes every row on its PUBACK.
        """
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        if page_rows < 1:
            raise ValueError(f"page_rows must be >= 1, got {page_rows}")
        p = Path(path)
        loaded = await asyncio.to_thread(open_db, p, synchronous, time.time())
        outbox = cls(p, max_bytes, loaded, max_batch, page_rows, confirming)
        await outbox._sequences.ready()
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

    # ---- stats -------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def max_bytes(self) -> int:
        return self._index.max_bytes

    @property
    def depth(self) -> int:
        """Rows stored and not acked yet (pending and in flight)."""
        return self._index.depth

    @property
    def bytes(self) -> int:
        """Sum of topic + payload bytes of the rows counted in `depth`."""
        return self._index.bytes

    @property
    def inflight(self) -> int:
        return len(self._index.inflight)

    @property
    def indexed_rows(self) -> int:
        """Rows whose index entry is held in memory (pages + in flight): bounded, not the depth."""
        return self._index.indexed_rows

    @property
    def available(self) -> bool:
        """False after a failed commit (disk full, I/O error) until a later commit succeeds."""
        return self._healthy and not self._closed

    @property
    def evicted(self) -> dict[Priority, int]:
        """Rows evicted to make room, by class (persisted in the file: totals since it was created)."""
        return dict(self._counters[KIND_EVICTED])

    @property
    def expired(self) -> dict[Priority, int]:
        """Rows dropped unsent because their `expires_at` passed, by class (persisted)."""
        return dict(self._counters[KIND_EXPIRED])

    @property
    def rejected(self) -> dict[Priority, int]:
        """Puts refused with OutboxFullError, by class (persisted)."""
        return dict(self._counters[KIND_REJECTED])

    @property
    def delivery(self) -> Delivery:
        """How rows leave: on the cloud's confirmation or the broker's PUBACK, and the counts of it."""
        sent = self._index.sent
        if sent is None:
            return Delivery("broker")
        return Delivery("confirmed", unconfirmed=sent.count, resent=sent.resent, confirmed=sent.confirmed)

    # ---- producing ---------------------------------------------------------------------------

    async def next_sequence(self, name: str, at_least: int = 0) -> int:
        """The next number of the sequence `name`, committed before it is returned: greater than
        every number it gave before (in this process or an earlier one on this file), and at
        least `at_least`."""
        self._check_open()
        return await self._sequences.next_in(name, at_least)

    def next_seq(self) -> int:
        """The `seq` for a message the cloud will confirm (see sequences.py)."""
        self._check_open()
        return self._sequences.next_seq()

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
        rows: list[Row] = []
        rejected: list[str] = []
        commits: list[asyncio.Future[None]] = []
        try:
            async with self._admission:
                for msg in msgs:
                    verdict = self._admit(msg, now, rejected)
                    empty_reads = 0
                    while isinstance(verdict, NeedPage):
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

    def _insert(self, rows: list[Row]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self._loop.create_future()
        self._writer.submit(Insert(rows, fut))
        return fut

    def _admit(self, msg: OutMessage, now: float, rejected: list[str]) -> Row | NeedPage | None:
        """The encoded row to insert, or the page to wait for first, or None (rejected: no room)."""
        if msg.qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {msg.qos}")
        prio = msg.priority
        if prio.__class__ is not Priority:  # an int from a caller: the enum call costs ~1 µs, skip it
            prio = Priority(prio)
        nbytes = message_size(msg)
        verdict = self._index.admit(prio, nbytes, msg.expires_at)
        if isinstance(verdict, int):
            return encode_row(verdict, msg, nbytes, now)
        if isinstance(verdict, NeedPage):
            return verdict
        self._reject(msg, prio, nbytes, verdict, rejected)
        return None

    def _reject(self, msg: OutMessage, prio: Priority, nbytes: int, reason: str, rejected: list[str]) -> None:
        self._count(KIND_REJECTED, {prio: 1}, [])
        log.warning(
            "outbox full, message rejected path=%s priority=%s msg_id=%s nbytes=%d bytes=%d max_bytes=%d",
            self._path,
            prio.name,
            msg.msg_id,
            nbytes,
            self._index.bytes,
            self._index.max_bytes,
        )
        rejected.append(f"outbox {self._path} full: {prio.name} message {msg.msg_id}: {reason}")

    def _count(self, kind: str, counts: dict[Priority, int], ids: list[int]) -> None:
        """Count rows dropped (or puts refused) as `kind`, and delete the dropped rows from the file."""
        for p, n in counts.items():
            self._counters[kind][p] += n
        self._writer.submit(Delete(ids, {(kind, int(p)): n for p, n in counts.items()}))

    # ---- paging ------------------------------------------------------------------------------

    def _request_page(self, cls: PageClass) -> asyncio.Future[int]:
        """Ask the writer for the next page of `cls` (one read in flight per class at most)."""
        if cls.paging is not None:
            return cls.paging
        self._check_open()
        fut: asyncio.Future[int] = self._loop.create_future()
        fut.add_done_callback(_retrieve)
        cls.paging = fut
        self._writer.submit(PageRead(cls.priority, cls.cursor, self._page_rows, fut))
        return fut

    async def _page_in(self, prio: Priority) -> int:
        """Read the next page of `prio` into memory; returns how many rows it brought."""
        # Shielded: a cancelled taker must not cancel a read that others may be waiting on too.
        return await asyncio.shield(self._request_page(self._index.classes[prio]))

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
            ids, short = self._index.select(limit, max_priority, time.time())
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

    async def _fetch(self, ids: list[int]) -> list[Stored]:
        fut: asyncio.Future[list[Stored]] = self._loop.create_future()
        self._writer.submit(Fetch(ids, fut))
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
            self._index.vanished(missing)
        index = self._index
        for row in rows:
            index.fetched(row.row_id, row.msg.seq)
        return rows

    def ack(self, row_ids: Iterable[int]) -> None:
        """The broker acknowledged these rows: delete them (batched, durable with the next commit).

        A crash before that commit re-sends them, which `msg_id` makes recognisable downstream.
        """
        ids = self._index.ack(row_ids)
        if ids and not self._closed:
            self._writer.submit(Delete(ids))

    def confirm(self, epoch: str, ranges: Iterable[tuple[int, int]]) -> int:
        """The cloud stored the messages of these seq ranges: delete them; returns how many.

        A confirmation for another epoch (meant for an earlier outbox file) is ignored.
        """
        if epoch != self.epoch:
            log.warning(
                "confirmation for another outbox ignored path=%s epoch=%s ours=%s", self._path, epoch, self.epoch
            )
            return 0
        ids = self._index.confirm(ranges)
        if ids and not self._closed:
            self._writer.submit(Delete(ids))
        return len(ids)

    def release_inflight(self) -> int:
        """Make every in-flight row pending again (e.g. the link disconnected); returns how many."""
        return self._return_to_pending(list(self._index.inflight))

    def _return_to_pending(self, ids: list[int]) -> int:
        moved = self._index.return_to_pending(ids)
        if moved:
            self._available.set()
        return moved

    def drop_expired(self, now: float) -> int:
        """Delete pending rows in memory whose `expires_at` is past (counted in `expired`).

        Returns how many. Rows still only in the file are checked when paged in and at open.
        """
        return self._index.drop_expired(now)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Commit everything queued (puts, acks, counters), then close the file."""
        if self._closed:
            return
        self._closed = True
        self._available.set()  # wake takers: they raise OutboxClosedError
        fut: asyncio.Future[None] = self._loop.create_future()
        self._writer.submit(Close(fut))
        self._writer.flush()
        await fut
        await asyncio.to_thread(self._writer.thread.join)
        log.info("outbox closed path=%s depth=%d bytes=%d", self._path, self.depth, self.bytes)

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxClosedError(f"outbox {self._path} is closed")

    def _apply_outcome(self, outcome: BatchOutcome) -> None:
        """Apply what the writer reports after a group commit (runs on the loop)."""
        if outcome.write_error is not None:
            self._healthy = False
        elif outcome.committed_upto:
            self._healthy = True
        if self._index.apply_outcome(outcome):
            self._commits += int(outcome.committed_upto > 0)
            self._available.set()
        for fut, result, error in outcome.resolutions:
            if fut.done():
                continue  # the awaiting put was cancelled; its rows are committed anyway
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)
