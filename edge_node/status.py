"""The node's periodic status line: how it is doing, for whoever reads its log on the device.

Every `[node] status_interval_s` (0: never), independent of telemetry, one INFO line:

    node status connected=yes inputs_per_s=20.0 results_per_s=19.8 escalations_sent=12 answered=11
    timed_out=1 outbox_depth=3 oldest_unsent_s=0.4 published=1520 rejected=0 bytes_up=61234 bytes_down=9120

Rates are over the interval; counts are since the node started. They are read from what the node
keeps anyway: its telemetry windows (each window, when it is closed, is added to the totals; the
open one is read as it stands), the outbox and the link (`published`: messages the broker acked;
`bytes_up`/`bytes_down`: what the link cost since the start as MQTT encodes it, see
edge_node/uplink/budget.py).

The oldest unsent message's age is read from the outbox file with a read-only connection in a
worker thread: the first row by id, one B-tree lookup (ids grow with each stored message), so it
costs nothing however deep the outbox is.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

from edge_node.telemetry import Window

log = logging.getLogger("edge_node.status")


class OutboxView(Protocol):
    @property
    def path(self) -> Path: ...

    @property
    def depth(self) -> int: ...


@dataclass
class Totals:
    """What the node did, summed over telemetry windows."""

    inputs: int = 0  # answered or rejected
    results: int = 0  # final answers
    rejected: int = 0
    escalations_sent: int = 0
    answered: int = 0
    timed_out: int = 0

    @classmethod
    def of(cls, window: Window) -> Totals:
        rejected = sum(window.rejected.values())
        tally = window.escalations
        return cls(
            inputs=window.count + rejected,
            results=window.count,
            rejected=rejected,
            escalations_sent=tally.sent,
            answered=tally.answered,
            timed_out=tally.timed_out,
        )

    def __add__(self, other: Totals) -> Totals:
        return Totals(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def oldest_created_at(path: Path) -> float | None:
    """When the oldest message still in the outbox file was stored (None: empty, or unreadable)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT created_at FROM outbox ORDER BY id LIMIT 1").fetchone()
    except sqlite3.Error as exc:  # busy, or a file of another layout: the line says "?" for once
        log.debug("oldest outbox row unreadable path=%s error=%s", path, exc)
        return None
    finally:
        conn.close()
    return None if row is None else float(row[0])


class StatusLine:
    """Logs the status line every `interval_s`; `closed(window)` is told of every finished window."""

    def __init__(
        self,
        interval_s: float,
        outbox: OutboxView,
        connected: Callable[[], bool],
        published: Callable[[], int],
        window: Callable[[], Window],
        clock: Callable[[], float] = time.monotonic,
        link_bytes: Callable[[], tuple[int, int]] = lambda: (0, 0),
    ) -> None:
        self.interval_s = interval_s
        self._link_bytes = link_bytes
        self._outbox = outbox
        self._connected = connected
        self._published = published
        self._window = window
        self._clock = clock
        self._closed = Totals()
        self._last = (clock(), Totals())

    def closed(self, window: Window) -> None:
        """A telemetry window was closed: its counts join the totals."""
        self._closed = self._closed + Totals.of(window)

    def totals(self) -> Totals:
        return self._closed + Totals.of(self._window())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            oldest = await asyncio.to_thread(oldest_created_at, self._outbox.path)
            log.info("%s", self.line(time.time(), oldest))

    def line(self, now: float, oldest: float | None) -> str:
        """The status line, with rates since the previous call."""
        at, totals = self._clock(), self.totals()
        (last_at, last) = self._last
        self._last = (at, totals)
        elapsed = max(1e-9, at - last_at)
        depth = self._outbox.depth
        up, down = self._link_bytes()
        age = "-" if depth == 0 else "?" if oldest is None else f"{max(0.0, now - oldest):.1f}"
        return (
            f"node status connected={'yes' if self._connected() else 'no'}"
            f" inputs_per_s={(totals.inputs - last.inputs) / elapsed:.1f}"
            f" results_per_s={(totals.results - last.results) / elapsed:.1f}"
            f" escalations_sent={totals.escalations_sent} answered={totals.answered} timed_out={totals.timed_out}"
            f" outbox_depth={depth} oldest_unsent_s={age} published={self._published()}"
            f" rejected={totals.rejected} bytes_up={up} bytes_down={down}"
        )
