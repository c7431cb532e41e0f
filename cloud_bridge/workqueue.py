"""The in-memory queue between a producer that must never block (an MQTT callback, a commit) and
the one task that drains it. Ingestion, escalation answers and alert publishing all use it."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class WorkQueue(Generic[T]):
    """`items` is a plain deque for the consumer; `put` and `close` wake it, never block."""

    def __init__(self) -> None:
        self.items: deque[T] = deque()
        self.closing = False
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self.items)

    def put(self, item: T) -> None:
        self.items.append(item)
        self._wake.set()

    def put_many(self, items: Iterable[T]) -> None:
        self.items.extend(items)
        self._wake.set()

    def close(self) -> None:
        """The consumer finishes what is queued, then `ready()` returns False."""
        self.closing = True
        self._wake.set()

    def take(self, limit: int) -> list[T]:
        return [self.items.popleft() for _ in range(min(len(self.items), limit))]

    async def ready(self) -> bool:
        """Wait until an item is queued: True; or until closed with nothing left: False."""
        while not self.items:
            if self.closing:
                return False
            self._wake.clear()
            await self._wake.wait()
        return True

    async def pause(self, delay_s: float) -> None:
        """Sleep up to `delay_s` (a retry backoff), cut short by a `put` or `close`."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay_s)
