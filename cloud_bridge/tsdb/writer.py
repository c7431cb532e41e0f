"""Writes line protocol to InfluxDB in batches, with retry and a spill file.

The writer keeps a bounded in-memory buffer; while InfluxDB is down the lines beyond that bound go to
an append-only spill file, which is replayed (oldest first) once writes succeed again, and everything
still buffered at shutdown is spilled too, so a TSDB restart or a bridge restart loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.write_precision import WritePrecision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TsdbSettings:
    url: str
    org: str
    bucket: str
    token: str
    spill_path: Path
    batch_lines: int = 5000
    flush_interval_s: float = 0.5
    buffer_max_lines: int = 100_000
    retry_max_s: float = 10.0


class TsdbWriter:
    """Buffers lines and writes them to InfluxDB's v2 write API in batches from a worker thread."""

    def __init__(self, settings: TsdbSettings) -> None:
        self._s = settings
        self._client = InfluxDBClient(url=settings.url, token=settings.token, org=settings.org, timeout=10_000)
        self._api = self._client.write_api(write_options=SYNCHRONOUS)
        self._buffer: deque[str] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self.written = 0
        self.failures = 0
        self.spilled = 0

    @property
    def pending(self) -> int:
        return len(self._buffer) + self._spilled_lines()

    def add(self, lines: Iterable[str]) -> None:
        """Accept lines for writing; past the memory bound they go to the spill file right away."""
        self._buffer.extend(lines)
        overflow = len(self._buffer) - self._s.buffer_max_lines
        if overflow > 0:
            self._spill([self._buffer.popleft() for _ in range(overflow)])
        self._idle.clear()
        self._wake.set()

    def _spill(self, lines: list[str]) -> None:
        with self._s.spill_path.open("a", encoding="utf-8") as fh:
            fh.write("".join(f"{ln}\n" for ln in lines))
            fh.flush()
            os.fsync(fh.fileno())
        self.spilled += len(lines)
        log.warning("tsdb spilled lines=%d path=%s", len(lines), self._s.spill_path)

    def _spilled_lines(self) -> int:
        path = self._s.spill_path
        if not path.exists():
            return 0
        with path.open("rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 16), b""))

    async def run(self) -> None:
        """Write until `close()`; on close, what could not be written is spilled for the next start."""
        delay = self._s.flush_interval_s
        while True:
            if not self._buffer and not self._s.spill_path.exists():
                self._idle.set()
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            ok = await self._write_some()
            if ok:
                delay = self._s.flush_interval_s
                continue
            if self._closing:
                self._spill(list(self._buffer))
                self._buffer.clear()
                self._idle.set()
                return
            await self._wait_or_close(delay)
            delay = min(delay * 2, self._s.retry_max_s)

    async def _wait_or_close(self, delay: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except TimeoutError:
            return

    async def _write_some(self) -> bool:
        # Spilled lines are older: replay them first so points arrive roughly in order.
        if self._s.spill_path.exists():
            return await self._replay_spill()
        batch = [self._buffer[i] for i in range(min(len(self._buffer), self._s.batch_lines))]
        if not await self._send(batch):
            return False
        for _ in batch:
            self._buffer.popleft()
        return True

    async def _replay_spill(self) -> bool:
        path = self._s.spill_path
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln]
        for start in range(0, len(lines), self._s.batch_lines):
            if not await self._send(lines[start : start + self._s.batch_lines]):
                # Keep what is left; rewrite so already-sent chunks are not resent.
                rest = lines[start:]
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(f"{ln}\n" for ln in rest), encoding="utf-8")
                tmp.replace(path)
                return False
        path.unlink()
        log.info("tsdb spill replayed lines=%d", len(lines))
        return True

    async def _send(self, batch: list[str]) -> bool:
        # Any failure (connection refused, HTTP 5xx, timeout) means "keep the lines and retry later".
        try:
            body = "\n".join(batch)
            # WritePrecision's members are plain str constants, though the signature names the class.
            precision: WritePrecision = WritePrecision.MS  # type: ignore[assignment]
            await asyncio.to_thread(
                self._api.write, bucket=self._s.bucket, org=self._s.org, record=body, write_precision=precision
            )
        except Exception as exc:
            self.failures += 1
            log.warning("tsdb write failed lines=%d error=%s", len(batch), str(exc).splitlines()[0][:200])
            return False
        self.written += len(batch)
        return True

    async def flush(self, deadline_s: float) -> bool:
        """Wait until everything accepted so far is written (or spilled at close); False on timeout."""
        self._wake.set()
        try:
            await asyncio.wait_for(self._idle.wait(), deadline_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self._closing = True
        self._wake.set()

    def dispose(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]
