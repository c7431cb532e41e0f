"""Rows the broker acknowledged that await the cloud's confirmation (delivery = "confirmed").

A broker's PUBACK is not storage: a broker restart can forget a shared subscription, a gateway's
queue can overflow (docs/traps.md #8). So a row that carries a `seq` (a message the cloud
confirms) is not deleted on PUBACK: it becomes *sent* and stays in the outbox, counted in its byte
budget and evictable (first within its class: it has most likely arrived), until the cloud
confirms its seq (confirm/1), or until its timeout passes and it is sent again; the timeout
doubles with every attempt, up to a cap.

Sent rows are held in memory, bounded by `window`: past it no new row (but CONTROL) is handed out
until confirmations come, so a device whose cloud is down stops spending its link on data nobody
stores, and the overdue rows it sends again serve as probes. A restart forgets which rows were
sent: they are pending again, sent again, and the cloud drops the copies by `msg_id`.

Runs on the event loop; the index (index.py) consults it when it selects, acks and evicts.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from edge_node.uplink.message import Priority


@dataclass(frozen=True, slots=True)
class Confirming:
    """End-to-end delivery: how many sent rows may await confirmation, and when to send them again."""

    window: int = 4096
    timeout_s: float = 60.0
    timeout_max_s: float = 3600.0

    def due_after(self, attempts: int) -> float:
        """Seconds to wait for the confirmation of a row sent `attempts` times."""
        return float(min(self.timeout_s * 2.0 ** max(attempts - 1, 0), self.timeout_max_s))


@dataclass(frozen=True, slots=True)
class Delivery:
    """How rows leave the outbox, as telemetry reports it: rows awaiting confirmation now, and rows
    sent again and confirmed since the outbox opened."""

    mode: Literal["confirmed", "broker"]
    unconfirmed: int = 0
    resent: int = 0
    confirmed: int = 0


@dataclass(slots=True)
class SentRow:
    priority: Priority
    nbytes: int
    seq: int
    attempts: int  # times sent
    due: float = 0.0  # monotonic time after which it is sent again


@dataclass(slots=True)
class _Class:
    waiting: OrderedDict[int, SentRow] = field(default_factory=OrderedDict)  # row id -> row, oldest first
    overdue: OrderedDict[int, SentRow] = field(default_factory=OrderedDict)  # to be sent again first
    nbytes: int = 0


class SentRows:
    """The sent rows of every class, by row id and by seq, with their confirmation deadlines."""

    def __init__(self, policy: Confirming) -> None:
        self.policy = policy
        self._classes = {p: _Class() for p in Priority}
        self._due: list[tuple[float, int]] = []  # heap of (due, row id); stale entries are skipped
        self._by_seq: dict[int, int] = {}  # seq -> row id, of rows sent or in flight with a seq
        self.count = 0
        self.resent = 0  # totals since open
        self.confirmed = 0

    def nbytes(self, priority: Priority) -> int:
        return self._classes[priority].nbytes

    def track(self, row_id: int, seq: int) -> None:
        """A row in flight carries `seq`: a confirmation may name it before its PUBACK comes."""
        self._by_seq[seq] = row_id

    def untrack(self, seq: int) -> None:
        self._by_seq.pop(seq, None)

    def add(self, row_id: int, row: SentRow) -> None:
        """The broker acknowledged a row with a seq: wait for its confirmation until `due`."""
        row.due = time.monotonic() + self.policy.due_after(row.attempts)
        cls = self._classes[row.priority]
        cls.waiting[row_id] = row
        cls.nbytes += row.nbytes
        self.count += 1
        self._by_seq[row.seq] = row_id
        heapq.heappush(self._due, (row.due, row_id))

    def take_overdue(self, priority: Priority, limit: int) -> list[tuple[int, SentRow]]:
        """Up to `limit` rows of a class whose confirmation is overdue, oldest first: to send again."""
        if self._due and self._due[0][0] <= time.monotonic():
            self._collect(time.monotonic())
        overdue = self._classes[priority].overdue
        out: list[tuple[int, SentRow]] = []
        while overdue and len(out) < limit:
            row_id, row = overdue.popitem(last=False)
            self._leave(row)
            self._by_seq[row.seq] = row_id  # in flight again: still confirmable
            out.append((row_id, row))
        self.resent += len(out)
        return out

    def evict(self, priority: Priority, need: int) -> tuple[list[int], int]:
        """Drop the oldest sent rows of a class until `need` bytes are freed: (ids, bytes freed)."""
        cls = self._classes[priority]
        ids: list[int] = []
        freed = 0
        for queue in (cls.overdue, cls.waiting):
            while queue and freed < need:
                row_id, row = queue.popitem(last=False)
                self._leave(row)
                self._by_seq.pop(row.seq, None)
                ids.append(row_id)
                freed += row.nbytes
        return ids, freed

    def confirm(self, ranges: Iterable[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[int]]:
        """The cloud stored these seq ranges (inclusive): ((row id, nbytes) of the sent rows it
        names, row ids of the named rows that are in flight). Unknown seqs are left alone: a row
        still pending after a restart is sent again and confirmed again."""
        sent: list[tuple[int, int]] = []
        inflight: list[int] = []
        by_seq = self._by_seq
        for first, last in ranges:
            if last - first > len(by_seq):
                named = [q for q in by_seq if first <= q <= last]
            else:
                named = [q for q in range(first, last + 1) if q in by_seq]
            for seq in named:
                row_id = by_seq.pop(seq)
                row = self._pop(row_id)
                if row is None:
                    inflight.append(row_id)
                else:
                    sent.append((row_id, row.nbytes))
        self.confirmed += len(sent) + len(inflight)
        return sent, inflight

    def _pop(self, row_id: int) -> SentRow | None:
        for cls in self._classes.values():
            row = cls.waiting.pop(row_id, None) or cls.overdue.pop(row_id, None)
            if row is not None:
                self._leave(row)
                return row
        return None

    def _leave(self, row: SentRow) -> None:
        self._classes[row.priority].nbytes -= row.nbytes
        self.count -= 1

    def _collect(self, now: float) -> None:
        while self._due and self._due[0][0] <= now:
            due, row_id = heapq.heappop(self._due)
            for cls in self._classes.values():
                row = cls.waiting.get(row_id)
                if row is not None:
                    if row.due == due:  # else stale: the row was sent again since
                        del cls.waiting[row_id]
                        cls.overdue[row_id] = row
                    break
