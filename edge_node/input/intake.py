"""The inputs a source took, and the bounded queue they wait in for the pipeline, a batch at a time.

`asyncio.Queue` moves one item per call, each with its capacity check, waiter scan and (for `put`)
a coroutine: about 1 µs per input on a 2-vCPU VM, which is a tenth of what the whole pipeline may
spend on an input of the demo model. Here the pipeline takes a micro-batch with one call, a source
that has several inputs at hand (a replay catching up, a directory scan) puts them with one call,
and a committed batch is finished with one `task_done(n)`. `join()` is what the SIGTERM drain
waits on: every input put has been finished (answered or rejected, and committed).

Producers that find it full wait (`put`, `put_many`) or are told so (`put_nowait` raises
IntakeFull: the MQTT source must never block its connection behind inference).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from edge_node.errors import InputRejected, IntakeFull


@dataclass(slots=True)
class InputItem:
    """One input the node took from a source; `on_done(item, ok)` tells the source how it ended."""

    input_id: str
    array: npt.NDArray[Any] | None
    accepted_at: float  # event-loop time when the node took the input
    truth: str | None = None
    source_ref: str | None = None
    error: InputRejected | None = None
    on_done: Callable[[InputItem, bool], None] | None = field(default=None, repr=False)


def notify_done(items: list[InputItem], ok: bool) -> None:
    """Tell each item's source how it ended: answered and durable (`ok`), or rejected."""
    for item in items:
        if item.on_done is not None:
            item.on_done(item, ok)


class Intake:
    """A bounded FIFO of InputItems with batch hand-over and `join()` (see the module docstring)."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        self.maxsize = maxsize
        self._items: deque[InputItem] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()  # consumers waiting for an input
        self._putters: deque[asyncio.Future[None]] = deque()  # producers waiting for room
        self._unfinished = 0
        self._finished = asyncio.Event()
        self._finished.set()

    def resize(self, maxsize: int) -> None:
        """Change the bound (the pipeline sizes it to its batches). Inputs already waiting stay,
        even past a lower bound; producers waiting for room re-check it."""
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        grew, self.maxsize = maxsize > self.maxsize, maxsize
        while grew and self._putters:
            _wake_one(self._putters)

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return len(self._items) >= self.maxsize

    @property
    def unfinished(self) -> int:
        """Inputs put and not yet finished (waiting, or taken and still in the pipeline)."""
        return self._unfinished

    # ---- producers -----------------------------------------------------------------------------
    def put_nowait(self, item: InputItem) -> None:
        if len(self._items) >= self.maxsize:
            raise IntakeFull(f"the intake holds {len(self._items)} inputs, its bound")
        self._add((item,))

    async def put(self, item: InputItem) -> None:
        while len(self._items) >= self.maxsize:
            await self._wait(self._putters)
        self._add((item,))

    async def put_many(self, items: Sequence[InputItem]) -> None:
        """Put every item, in order, as room frees up (a long sequence goes in over several batches)."""
        start = 0
        while start < len(items):
            while len(self._items) >= self.maxsize:
                await self._wait(self._putters)
            end = start + self.maxsize - len(self._items)
            self._add(items[start:end])
            start = end

    def _add(self, items: Sequence[InputItem]) -> None:
        if not self._unfinished:
            self._finished.clear()
        self._items.extend(items)
        self._unfinished += len(items)
        if self._getters:
            _wake_one(self._getters)

    # ---- the consumer --------------------------------------------------------------------------
    async def nonempty(self) -> None:
        """Wait until at least one input waits (then take it with `get_batch_nowait`)."""
        while not self._items:
            await self._wait(self._getters)

    def get_batch_nowait(self, limit: int) -> list[InputItem]:
        """Up to `limit` inputs, oldest first; an empty list when none waits."""
        items = self._items
        if len(items) <= limit:
            batch = list(items)
            items.clear()
        else:
            batch = [items.popleft() for _ in range(limit)]
        if batch:
            # Every waiting producer re-checks the room; with one source there is one at most.
            while self._putters:
                _wake_one(self._putters)
        if items:
            _wake_one(self._getters)  # another consumer waiting can take the rest
        return batch

    def hold(self, count: int) -> None:
        """Keep `count` inputs unfinished a while longer: their answers wait to be committed (the
        results coalescer); it calls `task_done` for them once they are."""
        if count:
            if not self._unfinished:
                self._finished.clear()
            self._unfinished += count

    def task_done(self, count: int = 1) -> None:
        """`count` inputs taken earlier are finished (answered or rejected, and committed)."""
        if count > self._unfinished:
            raise ValueError(f"task_done({count}) with only {self._unfinished} input(s) unfinished")
        self._unfinished -= count
        if not self._unfinished:
            self._finished.set()

    async def join(self) -> None:
        """Wait until every input put has been finished."""
        await self._finished.wait()

    # ---- waiting -------------------------------------------------------------------------------
    async def _wait(self, waiters: deque[asyncio.Future[None]]) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(future)
        try:
            await future
        except BaseException:
            future.cancel()  # cancelled before it was woken: it must not be woken later
            if future in waiters:
                waiters.remove(future)
            elif not future.cancelled():
                _wake_one(waiters)  # woken, then cancelled: hand the wake-up on, or it is lost
            raise


def _wake_one(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return
