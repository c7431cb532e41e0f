"""Writes line protocol to InfluxDB in batches: retry with backoff, a bounded spill, refusals counted.

Lines wait in a bounded memory buffer; past `buffer_max_lines` the oldest go to the spill on disk
(spill.py: bounded by `spill_max_bytes`, oldest dropped first), which is replayed first once writes
succeed again. At shutdown, what cannot be written is spilled for the next start, so a TSDB restart or
a bridge restart loses nothing short of the spill's bound. What each answer means is api.py's business:

- down or busy (no answer, 5xx, 429): keep everything, retry after a backoff doubling from
  `flush_interval_s` to `retry_max_s`; one warning when it starts, one line when it recovers.
- bad data (400, 422): the batch is dropped and its lines counted in `rejected` (the server kept
  the valid ones); the server's message is logged once per status code.
- wrong destination or credentials (401, 403, 404...): `blocked` holds the server's message and the
  fix, logged once; the lines are kept (memory, then spill), and one probe write goes out every
  `blocked_retry_s` (60 s) until the server accepts again.

`status()` is the writer's part of the bridge's periodic status line: lines written, pending (memory
and spill), spill bytes, failed attempts (retried), rejected lines (dropped as bad), lines dropped by
the spill bound, attempts refused for the destination or credentials, and whether that is the case now.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cloud_bridge.tsdb.api import Verdict, VerdictKind, WriteApi
from cloud_bridge.tsdb.spill import Spill
from cloud_bridge.tsdb.transport import HttpTransport, Transport

if TYPE_CHECKING:
    from cloud_bridge.config import InfluxConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TsdbSettings:
    url: str
    spill_path: Path  # a directory of spill segments; a file `<spill_path>.lp` of old versions is adopted
    api: str = "v2"
    org: str = ""
    bucket: str = ""
    token: str = ""
    database: str = ""
    retention_policy: str = ""
    username: str | None = None
    password: str | None = None
    batch_lines: int = 5000
    flush_interval_s: float = 0.5
    buffer_max_lines: int = 100_000
    retry_max_s: float = 10.0
    spill_max_bytes: int = 256 << 20
    blocked_retry_s: float = 60.0
    timeout_s: float = 10.0

    @classmethod
    def from_config(cls, influx: InfluxConfig, state_dir: Path) -> TsdbSettings:
        if influx.url is None:
            raise ValueError("[influx] url is not set: the bridge writes no series")
        return cls(
            url=influx.url,
            spill_path=state_dir / "tsdb-spill",
            api=influx.api,
            org=influx.org,
            bucket=influx.bucket,
            token=influx.token,
            database=influx.database,
            retention_policy=influx.retention_policy,
            username=influx.username,
            password=influx.password,
            batch_lines=influx.batch_lines,
            flush_interval_s=influx.flush_interval_s,
            buffer_max_lines=influx.buffer_max_lines,
            retry_max_s=influx.retry_max_s,
            spill_max_bytes=influx.spill_max_bytes,
        )


class TsdbWriter:
    """Buffers lines and writes them in batches from a worker thread (one request at a time)."""

    def __init__(self, settings: TsdbSettings, transport: Transport | None = None) -> None:
        self._s = settings
        self._api = WriteApi.build(
            url=settings.url,
            api=settings.api,
            database=settings.database,
            retention_policy=settings.retention_policy,
            org=settings.org,
            bucket=settings.bucket,
            token=settings.token,
            username=settings.username,
            password=settings.password,
        )
        self._transport = transport if transport is not None else HttpTransport(settings.url, settings.timeout_s)
        self._spill = Spill(
            settings.spill_path, settings.spill_max_bytes, legacy_file=settings.spill_path.with_suffix(".lp")
        )
        self._buffer: deque[str] = deque()
        self._inflight = 0  # buffer lines taken out for the request under way
        self._batch_limit = settings.batch_lines
        self._wake = asyncio.Event()
        self._closed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self.written = 0  # lines the server accepted
        self.failures = 0  # write attempts without an answer, or answered 5xx/429: retried
        self.rejected = 0  # lines of batches the server refused as bad data: dropped
        self.blocked_attempts = 0  # writes refused for the destination or credentials: lines kept
        self.spilled = 0  # lines moved to the spill
        self.blocked: str | None = None  # while blocked: the server's message and what to fix
        self._logged: set[int] = set()  # HTTP statuses whose refusal was logged
        self._down_since: float | None = None
        self._failed_in_row = 0

    @property
    def pending(self) -> int:
        """Lines accepted but not written yet: in memory, in flight and in the spill."""
        return len(self._buffer) + self._inflight + self._spill.lines

    @property
    def dropped(self) -> int:
        """Lines the spill's byte bound dropped unsent (oldest first)."""
        return self._spill.dropped

    def status(self) -> str:
        return (
            f"tsdb_written={self.written} tsdb_pending={self.pending} tsdb_spill_bytes={self._spill.disk_bytes} "
            f"tsdb_failures={self.failures} tsdb_rejected={self.rejected} tsdb_dropped={self.dropped} "
            f"tsdb_refused={self.blocked_attempts} tsdb_blocked={'yes' if self.blocked else 'no'}"
        )

    def add(self, lines: Iterable[str]) -> None:
        """Accept lines for writing; past the memory bound the oldest go to the spill file right away."""
        self._buffer.extend(lines)
        self._bound_buffer()
        self._idle.clear()
        self._wake.set()

    def _bound_buffer(self) -> None:
        overflow = len(self._buffer) - self._s.buffer_max_lines
        if overflow > 0:
            self._to_spill([self._buffer.popleft() for _ in range(overflow)])

    def _to_spill(self, lines: list[str]) -> None:
        if lines:
            self._spill.append(lines)
            self.spilled += len(lines)
            log.debug("tsdb spilled lines=%d dir=%s", len(lines), self._s.spill_path)

    async def run(self) -> None:
        """Write until `close()`; on close, what could not be written is spilled for the next start."""
        delay = self._s.flush_interval_s
        while True:
            if not self._buffer and not self._spill:
                self._idle.set()
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            kind = await self._write_some()
            if kind in ("ok", "reject", "too_large"):
                delay = self._s.flush_interval_s
                continue
            if self._closing:
                self._to_spill(list(self._buffer))
                self._buffer.clear()
                self._idle.set()
                return
            # New lines do not shorten a backoff (that would hammer a server that is down); close does.
            await self._wait_closed(self._s.blocked_retry_s if kind == "blocked" else delay)
            if kind == "retry":
                delay = min(delay * 2, self._s.retry_max_s)

    async def _wait_closed(self, delay: float) -> None:
        try:
            await asyncio.wait_for(self._closed.wait(), delay)
        except TimeoutError:
            return

    async def _write_some(self) -> VerdictKind:
        # Spilled lines are older: replay them first so points arrive roughly in order.
        chunk = self._spill.read(self._batch_limit)
        if chunk is not None:
            verdict = await self._send(chunk.lines) if chunk.lines else Verdict("ok")
            if verdict.kind in ("ok", "reject"):
                self._spill.consume(chunk)
            else:
                self._spill.abandon(chunk)
            return verdict.kind
        batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), self._batch_limit))]
        self._inflight = len(batch)
        try:
            verdict = await self._send(batch)
        finally:
            self._inflight = 0
        if verdict.kind not in ("ok", "reject"):
            # Back in front of what arrived meanwhile, then the memory bound applies again.
            self._buffer.extendleft(reversed(batch))
            self._bound_buffer()
        return verdict.kind

    async def _send(self, batch: list[str]) -> Verdict:
        body = "\n".join(batch).encode("utf-8")
        try:
            answer = await asyncio.to_thread(self._transport.post, self._api.target, body, self._api.headers)
        except OSError as exc:
            text = str(exc).splitlines()[0][:200] if str(exc) else ""
            verdict = Verdict("retry", f"{type(exc).__name__}: {text}")
        else:
            verdict = self._api.verdict(answer)
            if verdict.kind == "too_large" and len(batch) == 1:
                verdict = Verdict("reject", f"{verdict.detail}; a single line cannot be split", verdict.status)
        self._account(verdict, len(batch))
        return verdict

    def _account(self, verdict: Verdict, lines: int) -> None:
        kind, where = verdict.kind, self._api.destination
        if kind == "ok":
            self.written += lines
            if self._down_since is not None:
                log.info(
                    "tsdb write recovered after failures=%d down_s=%.1f",
                    self._failed_in_row,
                    time.monotonic() - self._down_since,
                )
                self._down_since, self._failed_in_row = None, 0
            if self.blocked is not None:
                log.info("tsdb writes to %s accepted again", where)
                self.blocked = None
        elif kind == "retry":
            self.failures += 1
            self._failed_in_row += 1
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning(
                    "tsdb write failed lines=%d error=%s: retrying with backoff up to %.0fs "
                    "(later failures are counted in the status line)",
                    lines,
                    verdict.detail,
                    self._s.retry_max_s,
                )
        elif kind == "reject":
            self.rejected += lines
            self._log_once(verdict.status, "tsdb write rejected lines=%d by %s: %s", lines, where, verdict.detail)
            log.debug("tsdb write rejected lines=%d detail=%s", lines, verdict.detail)
        elif kind == "blocked":
            self.blocked_attempts += 1
            if self.blocked is None:
                log.error(
                    "tsdb writes to %s refused: %s. Lines are kept (spilled past [influx] buffer_max_lines, "
                    "oldest dropped past spill_max_bytes) and one write is tried every %.0fs",
                    where,
                    verdict.detail,
                    self._s.blocked_retry_s,
                )
            self.blocked = verdict.detail
        else:  # too_large: split the batch
            self._batch_limit = max(1, min(self._batch_limit, lines) // 2)
            self._log_once(
                verdict.status,
                "tsdb batch too large for %s, now at most %d lines: %s",
                where,
                self._batch_limit,
                verdict.detail,
            )

    def _log_once(self, key: int, message: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.error(message + " (logged once; the status line counts them)", *args)

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
        self._closed.set()
        self._wake.set()

    def dispose(self) -> None:
        self._transport.close()
