"""The SQLite batch writer: every ingest batch committed from one dedicated thread, in one hop.

With aiosqlite every statement is a round trip between the event loop and aiosqlite's thread (a
queue put, the statement, a `call_soon_threadsafe` back). An ingest batch runs 10-20 statements (the
seen ids, one executemany per table, the device upsert, drift's lock/save/alerts), and each hop waits
for both threads to be scheduled and to take the GIL. Measured at 10,000 simulated devices on a busy
2-core machine: 295 ms of wall time per batch commit while the process used 27% of a core, so the
bridge stored 660 messages/s and fell behind while mostly waiting.

Here the whole transaction (`Registry._write_batch_sync`) runs as one call on a single writer thread
with its own plain sqlite3 connection (WAL, synchronous NORMAL, as the async engine's), so a batch
costs one hop each way, and the event loop goes on receiving and planning the next batch meanwhile.
The async engine keeps serving every other query; SQLite's busy timeout orders the two writers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine


class SqliteBatchWriter:
    """Runs `fn(conn)` inside one transaction on the writer thread; one batch at a time, in order."""

    def __init__(
        self,
        db_path: str,
        on_connect: Callable[[Any, Any], None],
        json_serializer: Callable[[Any], str],
        json_deserializer: Callable[[str | bytes], Any],
    ) -> None:
        # check_same_thread off: the pool hands the connection back from the writer thread only, but
        # it is created (and disposed) from whichever thread opens or closes the registry.
        self.engine: Engine = create_engine(
            f"sqlite:///{db_path}",
            json_serializer=json_serializer,
            json_deserializer=json_deserializer,
            connect_args={"check_same_thread": False},
            pool_size=1,
            max_overflow=0,
        )
        event.listen(self.engine, "connect", on_connect)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-writer")

    async def run(self, fn: Callable[[Connection], None]) -> None:
        """Commit what `fn` writes (rolled back, and the error raised here, if it raises)."""
        await asyncio.get_running_loop().run_in_executor(self._thread, self._transaction, fn)

    def _transaction(self, fn: Callable[[Connection], None]) -> None:
        with self.engine.begin() as conn:
            fn(conn)

    def close(self) -> None:
        """Wait for the batch being written, then close the connection (blocking: call from a thread)."""
        self._thread.shutdown(wait=True)
        self.engine.dispose()
