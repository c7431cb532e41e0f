"""Numbers the outbox hands out that must keep growing across restarts: message `seq`s and named
sequences (the link numbers its connections with one).

A `seq` is handed out synchronously, on the hot path, from a block reserved in the file ahead of
time (one commit per block, not per message): every seq up to the reserved mark may have been
used, so a restarted outbox starts above it, and a confirmation still queued for the device from
before the restart can only name rows it really confirms.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from edge_node.errors import OutboxUnavailableError
from edge_node.uplink.outbox.sqlite import SEQ_RESERVED
from edge_node.uplink.outbox.writer import NextSequence, Writer

SEQ_BLOCK = 1 << 16


class Sequences:
    """The outbox's counters; `start` once the writer runs, `await ready()` before the first seq."""

    def __init__(self, path: Path, writer: Writer, loop: asyncio.AbstractEventLoop, reserved: int) -> None:
        self._path = path
        self._writer = writer
        self._loop = loop
        # Seqs handed out come from [next, limit]; the next block is reserved while half is left.
        self._next = reserved + 1
        self._limit = reserved
        self._reserving: asyncio.Future[int] | None = None

    def start(self) -> None:
        self._reserve()

    async def ready(self) -> None:
        if self._reserving is not None:
            await asyncio.shield(self._reserving)

    def next_seq(self) -> int:
        """Greater than every seq handed out before, in this process or an earlier one on the file."""
        if self._next > self._limit:
            # The next block is reserved with half of this one left: only a burst of SEQ_BLOCK/2
            # messages within one commit gets here.
            raise OutboxUnavailableError(f"outbox {self._path}: sequence numbers not reserved yet; retry")
        seq = self._next
        self._next += 1
        if self._limit - seq < SEQ_BLOCK // 2 and self._reserving is None:
            self._reserve()
        return seq

    async def next_in(self, name: str, at_least: int = 0) -> int:
        """The next number of the named sequence, committed before it is returned."""
        fut: asyncio.Future[int] = self._loop.create_future()
        self._writer.submit(NextSequence(name, at_least, fut))
        return await fut

    def _reserve(self) -> None:
        fut: asyncio.Future[int] = self._loop.create_future()
        fut.add_done_callback(self._reserved)
        self._reserving = fut
        self._writer.submit(NextSequence(SEQ_RESERVED, self._limit + SEQ_BLOCK, fut))

    def _reserved(self, fut: asyncio.Future[int]) -> None:
        self._reserving = None
        if not fut.cancelled() and fut.exception() is None:
            self._limit = max(self._limit, fut.result())
