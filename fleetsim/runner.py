"""Runs a simulated fleet as worker processes (fleetsim/worker.py) and gathers their reports.

One worker drives its share of the devices from one thread; several workers use several cores (a
worker at 10,000 devices of the default profile needs about a tenth of one, see docs/scaling.md).
Each worker gets its `Spec` on stdin (credentials never appear on a command line) and prints JSON
lines on stdout, read here as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

from fleetsim.options import Spec
from fleetsim.report import Snapshot, merge

READ_LIMIT = 1 << 26  # a report line holds every escalation latency of its interval


class SimulatorError(Exception):
    """A worker could not start or stopped early (the message is the worker's own)."""


class Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.latest: dict[str, Any] = {}
        self.unread: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None
        self.error: str | None = None
        self.reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def first_line(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        if not line:
            raise SimulatorError(f"a simulator worker exited at start (status {await self.proc.wait()})")
        data: dict[str, Any] = json.loads(line)
        return data

    async def read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            data = json.loads(line)
            if "error" in data:
                self.error = data["error"]
                continue
            self.latest = data
            self.unread.append(data)
            if data.get("final"):
                self.final = data


class Fleet:
    """The worker processes of one simulated fleet."""

    def __init__(self, spec: Spec, processes: int) -> None:
        self.spec = spec
        self.parts = max(1, min(processes, spec.devices))
        self.workers: list[Worker] = []

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    async def start(self, timeout_s: float = 180.0) -> Snapshot:
        """Start every worker and wait until all devices are subscribed and online."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for i in range(self.parts):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "fleetsim.worker",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=READ_LIMIT,
                env=env,
            )
            assert proc.stdin is not None
            proc.stdin.write(self.spec.part(i, self.parts).to_json().encode() + b"\n")
            await proc.stdin.drain()
            self.workers.append(Worker(proc))
        try:
            for w in self.workers:
                first = await w.first_line(timeout_s)
                if "error" in first:
                    raise SimulatorError(first["error"])
                if not first.get("ready"):
                    raise SimulatorError(f"a simulator worker said {first!r} instead of ready")
        except (SimulatorError, TimeoutError) as exc:
            await self.kill()
            if isinstance(exc, TimeoutError):
                raise SimulatorError(f"the simulator workers were not ready within {timeout_s:g} s") from None
            raise
        for w in self.workers:
            w.reader = asyncio.create_task(w.read())
        return Snapshot(time.time())

    def snapshot(self) -> Snapshot:
        """What the workers reported so far (raises `SimulatorError` when one failed)."""
        for w in self.workers:
            if w.error is not None:
                raise SimulatorError(w.error)
            if w.reader is not None and w.reader.done() and w.final is None:
                raise SimulatorError(f"a simulator worker exited during the run (pid {w.pid})")
        since = [line for w in self.workers for line in w.unread]
        for w in self.workers:
            w.unread = []
        return merge(time.time(), [w.latest for w in self.workers if w.latest], since)

    async def stop(self, timeout_s: float = 180.0) -> Snapshot:
        """Ask every worker to stop, and wait for their final reports."""
        for w in self.workers:
            assert w.proc.stdin is not None
            w.proc.stdin.write(b"stop\n")
            with contextlib.suppress(ConnectionError):  # a worker that already exited reports below
                await w.proc.stdin.drain()
        try:
            async with asyncio.timeout(timeout_s):
                for w in self.workers:
                    if w.reader is not None:
                        await w.reader
                    await w.proc.wait()
        except TimeoutError:
            await self.kill()
            raise SimulatorError(f"the simulator workers did not stop within {timeout_s:g} s") from None
        missing = [w.pid for w in self.workers if w.final is None]
        if missing:
            errors = [w.error for w in self.workers if w.error]
            raise SimulatorError("; ".join(errors) or f"workers {missing} ended without their final report")
        return self.snapshot()

    async def kill(self) -> None:
        for w in self.workers:
            if w.proc.returncode is None:
                w.proc.kill()
                await w.proc.wait()
