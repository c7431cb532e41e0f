"""The outbox's in-memory index of its rows: totals, pages of the oldest rows, eviction, expiry.

Memory stays flat however deep the queue gets: the rows live in the file, the loop keeps only
counters (rows and bytes per priority class), the rows in flight (bounded by the link's window)
and, per class, a bounded *page* of the oldest pending rows' ids, sizes and expiry times. A page
is read from SQLite (one indexed range query on `(priority, id)`) when a class's page runs low,
so `take`, `ack` and the stats never wait for SQLite in the steady state. Per class, every
pending row with an id up to the page's `cursor` is in the page; the rows above it exist only in
the file until paged in. A put appends to its class's page directly while nothing of that class
waits in the file (the common, shallow case), else it goes to the file only. Eviction needs the
oldest rows of the victim classes: when a victim's page is exhausted the put awaits the next
page (`NeedPage`; the outbox serialises puts for that).

Row ids are assigned here, on the loop, in put order, so acks, evictions and inserts can be queued
to the single writer in order without waiting for `lastrowid`. A row becomes visible to `select`
only once its transaction committed (`committed_upto`, or read back by a page query): nothing is
ever sent that a crash could forget.

Bounded by `max_bytes` (topic + payload bytes of the stored rows). A put that would exceed it evicts
pending rows of its own class or a lower one (SAMPLES first, oldest first), never a row in flight,
never a CONTROL row, never a row of a higher class than the new message: a sample must not push out
an escalation. If that cannot make room the put is refused (the outbox raises `OutboxFullError`,
counted in `rejected`); it never waits for the uplink (at most for one page read from the file), so
inference never does.

Escalation requests carry their deadline as `expires_at`: an expired row is dropped (counted in
`expired`), never sent: `select` checks every row it hands out, and `drop_expired` drops those in
the pages (rows still only in the file are dropped when paged in, or at the next open, in SQL).

With delivery confirmed end to end, a PUBACK does not delete a row that carries a seq: it moves to
`SentRows` (sent.py) until the cloud confirms it, evictable first within its class, and is sent
again before the class's page when overdue; past the sent window only CONTROL rows are new.

Everything here is synchronous and runs on the event loop; what must reach the file (deleted rows
and their counters, page reads) goes out through the two callables the outbox hands in.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from edge_node.uplink.message import Priority
from edge_node.uplink.outbox.sent import SentRow, SentRows
from edge_node.uplink.outbox.sqlite import KIND_EVICTED, KIND_EXPIRED, PageRow
from edge_node.uplink.outbox.writer import BatchOutcome

log = logging.getLogger(__name__)

# Rows per page read from the file, per class. 5 classes x 512 rows x ~150 B is the whole index
# the loop keeps beyond the rows in flight; a page is one indexed range read (~0.5 ms).
DEFAULT_PAGE_ROWS = 512

# Who may be evicted for a message of each class: its own class or lower, SAMPLES first, never CONTROL.
_VICTIMS: dict[Priority, tuple[Priority, ...]] = {
    prio: tuple(p for p in reversed(Priority) if p >= prio and p != Priority.CONTROL) for prio in Priority
}

# (kind, rows dropped per class, their ids): rows to delete from the file and count as `kind`.
Drop = Callable[[str, dict[Priority, int], list[int]], None]


@dataclass(slots=True)
class Meta:
    priority: Priority
    nbytes: int
    expires_at: float | None
    seq: int | None = None  # known once the row is fetched: the rows the cloud confirms carry one
    attempts: int = 0  # times fetched for sending (the confirmation timeout doubles with each)


@dataclass(slots=True)
class PageClass:
    """The pending rows of one priority class: totals, and the page of the oldest ones in memory.

    Invariant: every pending row of the class with id <= `cursor` is in `page` (in id order); the
    rows above it are only in the file. `count`/`nbytes` cover both.
    """

    priority: Priority
    page: OrderedDict[int, Meta] = field(default_factory=OrderedDict)
    cursor: int = 0
    count: int = 0
    nbytes: int = 0
    paging: asyncio.Future[int] | None = None  # the page read in flight, at most one per class

    @property
    def in_file_only(self) -> int:
        return self.count - len(self.page)


@dataclass(slots=True)
class NeedPage:
    """`admit` cannot decide before the next page of this class is read (eviction past its page)."""

    priority: Priority


class Index:
    """What the loop knows of the stored rows, without reading the file (see the module docstring)."""

    def __init__(
        self, path: Path, max_bytes: int, page_rows: int, *, drop: Drop, want_page: Callable[[PageClass], object]
    ) -> None:
        self._path = path  # for the logs
        self.max_bytes = max_bytes
        self._page_rows = page_rows
        self._low_water = max(1, page_rows // 4)
        self._drop = drop
        self._want_page = want_page
        self.classes: dict[Priority, PageClass] = {p: PageClass(p) for p in Priority}
        self.inflight: dict[int, Meta] = {}
        self.bytes = 0
        self.next_id = 1
        self.committed_upto = 0
        self.sent: SentRows | None = None  # None: a PUBACK deletes the row (delivery = "broker")

    def load(self, classes: list[tuple[int, int, int]], max_id: int) -> None:
        """Start from the totals open found: all rows in the file only (cursor 0, empty pages)."""
        for prio, count, nbytes in classes:
            cls = self.classes[Priority(prio)]
            cls.count, cls.nbytes = count, nbytes
            self.bytes += nbytes
        self.next_id = max_id + 1
        self.committed_upto = max_id

    @property
    def sent_count(self) -> int:
        return self.sent.count if self.sent is not None else 0

    @property
    def depth(self) -> int:
        return len(self.inflight) + self.sent_count + sum(c.count for c in self.classes.values())

    @property
    def indexed_rows(self) -> int:
        return len(self.inflight) + self.sent_count + sum(len(c.page) for c in self.classes.values())

    def _sent_nbytes(self, cls: PageClass) -> int:
        return self.sent.nbytes(cls.priority) if self.sent is not None else 0

    # ---- admission and eviction ----------------------------------------------------------------

    def admit(self, prio: Priority, nbytes: int, expires_at: float | None) -> int | str | NeedPage:
        """Make room for a new row and give it an id; else why not (a reason), or the page it needs."""
        if self.bytes + nbytes > self.max_bytes:
            verdict = self._make_room(prio, nbytes)
            if verdict is not None:
                return verdict
        row_id = self.next_id
        self.next_id += 1
        cls = self.classes[prio]
        if cls.count == len(cls.page) and cls.paging is None and len(cls.page) < self._page_rows:
            # Nothing of this class waits in the file only: the page stays a true prefix.
            cls.page[row_id] = Meta(prio, nbytes, expires_at)
            cls.cursor = row_id
        cls.count += 1
        cls.nbytes += nbytes
        self.bytes += nbytes
        return row_id

    def _make_room(self, prio: Priority, nbytes: int) -> str | NeedPage | None:
        """Evict lower-or-equal priority rows, oldest first, until `nbytes` fits; else say why not.

        A message never evicts a row of a higher priority than its own, CONTROL rows are never
        evicted, and in-flight rows are never evicted (they may be acked any moment). Returns
        `NeedPage` (having evicted nothing) when the victims run past a class's in-memory page.
        """
        need = self.bytes + nbytes - self.max_bytes
        victims = [self.classes[p] for p in _VICTIMS[prio]]
        evictable = sum(c.nbytes + self._sent_nbytes(c) for c in victims)
        if evictable < need:
            return (
                f"needs {nbytes} B, {self.max_bytes - self.bytes} B free of {self.max_bytes} B and only"
                f" {evictable} B evictable (pending rows of priority {prio.name} or lower, never CONTROL)"
            )
        shortfall = self._plan(victims, need)
        if shortfall is not None:
            return shortfall
        ids: list[int] = []
        counts: dict[Priority, int] = {}
        for cls in victims:
            if self.sent is not None and need > 0:
                # Within a class, rows sent and awaiting confirmation go first: they have most
                # likely arrived already, the pending ones surely not.
                gone, freed = self.sent.evict(cls.priority, need)
                if gone:
                    ids.extend(gone)
                    counts[cls.priority] = counts.get(cls.priority, 0) + len(gone)
                    self.bytes -= freed
                    need -= freed
            page = cls.page
            while need > 0 and page:
                row_id, meta = page.popitem(last=False)
                cls.count -= 1
                cls.nbytes -= meta.nbytes
                self.bytes -= meta.nbytes
                need -= meta.nbytes
                ids.append(row_id)
                counts[cls.priority] = counts.get(cls.priority, 0) + 1
            if need <= 0:
                break
        log.info("outbox evicted rows path=%s counts=%s", self._path, {p.name: n for p, n in counts.items()})
        self._drop(KIND_EVICTED, counts, ids)
        return None

    def _plan(self, victims: list[PageClass], need: int) -> NeedPage | None:
        """Whether the in-memory pages hold enough victims; else the class whose next page is needed."""
        for cls in victims:
            need -= self._sent_nbytes(cls)
            if need <= 0:
                return None
            for meta in cls.page.values():
                need -= meta.nbytes
                if need <= 0:
                    return None
            if cls.in_file_only:
                return NeedPage(cls.priority)
        return None  # unreachable while the totals are right: evictable >= need was checked

    def forget(self, failed: list[tuple[int, int, int]]) -> None:
        """Drop the bookkeeping of rows whose insert failed (they are not in the file)."""
        for row_id, prio, nbytes in failed:
            cls = self.classes[Priority(prio)]
            meta = cls.page.pop(row_id, None)
            if meta is None and row_id <= cls.cursor:
                continue  # it was in the page and is gone already (evicted): nothing is counted
            cls.count -= 1
            cls.nbytes -= nbytes
            self.bytes -= nbytes

    # ---- paging --------------------------------------------------------------------------------

    def apply_outcome(self, outcome: BatchOutcome) -> bool:
        """Take in what a group commit reports: failed inserts, the committed mark, pages read.
        Returns whether rows became selectable (a take may be waiting for them)."""
        if outcome.failed:
            self.forget(outcome.failed)
        more = outcome.committed_upto > self.committed_upto
        if more:
            self.committed_upto = outcome.committed_upto
        for op, rows in outcome.pages:
            cls = self.classes[op.priority]
            if cls.paging is op.future:
                cls.paging = None
            self.apply_page(op.priority, rows)
            more = more or bool(rows)
        return more

    def apply_page(self, prio: Priority, rows: list[PageRow]) -> None:
        """Append a page read from the file to the class's page (rows it knows already are skipped)."""
        cls = self.classes[prio]
        page = cls.page
        for row_id, nbytes, expires_at in rows:
            if row_id > cls.cursor:  # rows at or below the cursor are known already
                page[row_id] = Meta(prio, nbytes, expires_at)
                cls.cursor = row_id

    # ---- consuming -----------------------------------------------------------------------------

    def select(self, limit: int, max_priority: Priority, now: float) -> tuple[list[int], Priority | None]:
        """Move up to `limit` committed rows from the pages to in-flight, by priority then age.

        Also returns the class whose page ran out while more of it waits in the file: no lower
        class may be served before it, so the caller reads its next page first.
        """
        chosen: list[int] = []
        expired: dict[Priority, int] = {}
        expired_ids: list[int] = []
        short: Priority | None = None
        committed = self.committed_upto
        inflight = self.inflight
        sent = self.sent
        for cls in self.classes.values():
            if cls.priority > max_priority:
                break
            take = limit
            if sent is not None:
                # Overdue for confirmation: sent again before anything new of the class.
                for row_id, row in sent.take_overdue(cls.priority, limit - len(chosen)):
                    inflight[row_id] = Meta(cls.priority, row.nbytes, None, row.seq, row.attempts)
                    chosen.append(row_id)
                if cls.priority != Priority.CONTROL:
                    # At most `window` rows sent or in flight without a confirmation: when the cloud
                    # confirms nothing (it may be down) no new rows go out.
                    take = min(limit, len(chosen) + sent.policy.window - sent.count - len(inflight))
            page = cls.page
            while page and len(chosen) < take:
                row_id = next(iter(page))
                if row_id > committed:
                    break
                meta = page.pop(row_id)
                cls.count -= 1
                cls.nbytes -= meta.nbytes
                if meta.expires_at is not None and meta.expires_at <= now:
                    self.bytes -= meta.nbytes
                    expired_ids.append(row_id)
                    expired[cls.priority] = expired.get(cls.priority, 0) + 1
                    continue
                inflight[row_id] = meta
                chosen.append(row_id)
            if len(page) < self._low_water and cls.in_file_only:
                self._want_page(cls)  # read ahead, so the drain rarely waits for a page
                if not page:
                    short = cls.priority
                    break
            if len(chosen) >= limit:
                break
        if expired_ids:
            self._drop(KIND_EXPIRED, expired, expired_ids)
        return chosen, short

    def vanished(self, ids: list[int]) -> None:
        """In-flight rows the file no longer has: stop counting them."""
        for i in ids:
            meta = self.inflight.pop(i, None)
            if meta is not None:
                self.bytes -= meta.nbytes
                if meta.seq is not None and self.sent is not None:
                    self.sent.untrack(meta.seq)

    def fetched(self, row_id: int, seq: int | None) -> None:
        """A row handed out was read from the file: count the attempt, and let its seq confirm it."""
        meta = self.inflight.get(row_id)
        if meta is not None:
            meta.attempts += 1
            if seq is not None and self.sent is not None:
                meta.seq = seq
                self.sent.track(row_id, seq)

    def ack(self, row_ids: Iterable[int]) -> list[int]:
        """The broker acknowledged these rows (in flight, or pending again); returns the ids to delete.

        With delivery confirmed, a row that carries a seq is not deleted but waits, sent, for the
        cloud's confirmation; every other row is done.
        """
        ids: list[int] = []
        sent = self.sent
        for row_id in row_ids:
            meta = self.inflight.pop(row_id, None) or self._pop_pending(row_id)
            if meta is None:
                continue
            if sent is not None and meta.seq is not None:
                sent.add(row_id, SentRow(meta.priority, meta.nbytes, meta.seq, meta.attempts))
                continue
            self.bytes -= meta.nbytes
            ids.append(row_id)
        return ids

    def confirm(self, ranges: Iterable[tuple[int, int]]) -> list[int]:
        """The cloud stored the rows of these seq ranges: the ids to delete (sent or in flight)."""
        if self.sent is None:
            return []
        done, inflight = self.sent.confirm(ranges)
        ids = [row_id for row_id, _ in done]
        self.bytes -= sum(n for _, n in done)
        for row_id in inflight:
            meta = self.inflight.pop(row_id, None)
            if meta is not None:
                self.bytes -= meta.nbytes
                ids.append(row_id)
        return ids

    def _pop_pending(self, row_id: int) -> Meta | None:
        for cls in self.classes.values():
            meta = cls.page.pop(row_id, None)
            if meta is not None:
                cls.count -= 1
                cls.nbytes -= meta.nbytes
                return meta
        return None

    def return_to_pending(self, ids: list[int]) -> int:
        """Put in-flight rows back in their pages, in age order; returns how many moved."""
        touched: set[Priority] = set()
        moved = 0
        for row_id in ids:
            meta = self.inflight.pop(row_id, None)
            if meta is None:
                continue
            if meta.seq is not None and self.sent is not None:
                if meta.attempts > 1:
                    # A copy sent again: it was sent before, so it stays sent, due again later.
                    self.sent.add(row_id, SentRow(meta.priority, meta.nbytes, meta.seq, meta.attempts))
                    continue
                self.sent.untrack(meta.seq)
                meta.seq = None
            meta.attempts = 0  # never acknowledged: its next send is its first
            moved += 1
            # Back into the page: its id is below the cursor (it came from the page).
            cls = self.classes[meta.priority]
            cls.page[row_id] = meta
            cls.count += 1
            cls.nbytes += meta.nbytes
            touched.add(meta.priority)
        for prio in touched:
            # Re-sort by row id (age): returned rows are older than the rows still pending.
            cls = self.classes[prio]
            cls.page = OrderedDict(sorted(cls.page.items()))
        return moved

    def drop_expired(self, now: float) -> int:
        """Drop the pending rows in the pages whose `expires_at` is past; returns how many."""
        counts: dict[Priority, int] = {}
        ids: list[int] = []
        for prio, cls in self.classes.items():
            page = cls.page
            dead = [i for i, m in page.items() if m.expires_at is not None and m.expires_at <= now]
            for row_id in dead:
                meta = page.pop(row_id)
                cls.count -= 1
                cls.nbytes -= meta.nbytes
                self.bytes -= meta.nbytes
            if dead:
                counts[prio] = len(dead)
                ids.extend(dead)
        if ids:
            log.info(
                "outbox dropped expired rows path=%s counts=%s",
                self._path,
                {p.name: n for p, n in counts.items()},
            )
            self._drop(KIND_EXPIRED, counts, ids)
        return len(ids)
