"""What drift costs the bridge: CPU per telemetry window committed with and without drift.

Used by `python bench/drift.py --cost`. A fleet of `devices` reports one telemetry window each per
ingest batch (as a bridge sees a fleet reporting every interval), `windows` batches in all; each
batch is committed by `Registry.commit_batch` with the drift hook attached exactly as ingestion
attaches it (`DriftStore.start`), on a fresh database per run:

* `plain`: the same batches without drift (what telemetry costs anyway);
* `per-window`: drift scored window by window (`DriftStore(batched=False)`, the reference path);
* `batched`: drift as the bridge runs it (numpy over the batch, cloud_bridge/drift/batch.py).

CPU is `time.process_time()` around each commit: the bridge process's CPU on every thread (the
aiosqlite thread included), so other processes on a loaded machine do not count; on PostgreSQL the
server's CPU is measured apart (psutil, over its processes). The time the garbage collector ran
inside those commits is reported too: it is part of the CPU, and grows with everything else the
process holds. Messages wait encoded (as the bridge receives them) and are decoded before each
batch, outside the timed part, so the collector does not walk thousands of decoded messages a
bridge would never hold at once. The paths run interleaved, `repeat` times; figures are medians
with the spread (min-max) over the repeats.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil

from cloud_bridge.drift.scoring import DriftSettings
from cloud_bridge.drift.store import DriftStore
from cloud_bridge.ingest.rows import telemetry_row
from cloud_bridge.registry import Batch, Registry, TelemetryRow
from schemas import Telemetry, decode, encode

PATHS = ("plain", "per-window", "batched")
TARGET_US = 100.0


def telemetry_batch(messages: Sequence[Telemetry]) -> Batch:
    """A registry batch holding these telemetry messages, as ingestion builds it."""
    batch = Batch()
    for m in messages:
        batch.seen.append({"msg_id": m.msg_id, "received_at": time.time()})
        base = {"msg_id": m.msg_id, "fleet_id": m.fleet_id, "device_id": m.device_id}
        batch.add_row(TelemetryRow, telemetry_row(base, m, batch.features))
    return batch


@dataclass
class Run:
    """One path's commits of every batch: seconds, summed over the batches."""

    cpu: float = 0.0
    wall: float = 0.0
    gc: float = 0.0
    server_cpu: float = 0.0  # the database server's, when it is a process of its own


class _GcClock:
    """CPU seconds the garbage collector ran while `on` (gc.callbacks)."""

    def __init__(self) -> None:
        self.on = False
        self.seconds = 0.0
        self._began = 0.0

    def __call__(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.process_time()
        elif self.on:
            self.seconds += time.process_time() - self._began


@contextmanager
def gc_clock() -> Iterator[_GcClock]:
    clock = _GcClock()
    gc.callbacks.append(clock)
    try:
        yield clock
    finally:
        gc.callbacks.remove(clock)


def server_cpu(port: int | None) -> float:
    """CPU seconds used so far by the PostgreSQL server listening on `port` (all its processes)."""
    if port is None:
        return 0.0
    total = 0.0
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "postgres" and f"-p {port}" in " ".join(p.info["cmdline"] or []):
            for q in [p, *p.children(recursive=True)]:
                try:
                    t = q.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                total += t.user + t.system
    return total


async def commit_all(url: str, batches: list[list[bytes]], store: DriftStore | None, port: int | None) -> Run:
    registry = Registry(url)
    await registry.create()
    run = Run()
    server0 = server_cpu(port)
    try:
        with gc_clock() as clock:
            for encoded in batches:
                batch = telemetry_batch([decode(data, Telemetry) for data in encoded])
                clock.on = True
                began, began_cpu = time.perf_counter(), time.process_time()
                if store is not None:
                    store.start(batch)
                await registry.commit_batch(batch)
                run.wall += time.perf_counter() - began
                run.cpu += time.process_time() - began_cpu
                clock.on = False
            run.gc = clock.seconds
        run.server_cpu = server_cpu(port) - server0
    finally:
        await registry.close()
    return run


@dataclass
class CostResult:
    devices: int
    windows: int
    database: str
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def per_window(self, path: str, what: Callable[[Run], float]) -> list[float]:
        n = self.devices * self.windows
        return [what(r) / n * 1e6 for r in self.runs[path]]

    def extra(self, path: str) -> list[float]:
        """Drift's CPU per window: the path's minus plain's in the same repeat."""
        cpu = self.per_window(path, lambda r: r.cpu)
        plain = self.per_window("plain", lambda r: r.cpu)
        return [a - b for a, b in zip(cpu, plain, strict=True)]


def measure(
    messages: list[list[Telemetry]],
    settings: DriftSettings,
    repeat: int,
    database: str,
    url_for: Callable[[str], str],
    port: int | None,
) -> CostResult:
    """Commit `messages` (a list per batch) along every path, `repeat` times, interleaved."""
    batches = [[encode(m) for m in batch] for batch in messages]
    result = CostResult(len(messages[0]), len(messages), database)
    for r in range(repeat):
        for path in PATHS:
            store = None if path == "plain" else DriftStore(settings, database, {}, batched=path == "batched")
            run = asyncio.run(commit_all(url_for(f"{path.replace('-', '_')}_{r}"), batches, store, port))
            result.runs.setdefault(path, []).append(run)
    return result


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def report(result: CostResult, load: str) -> list[str]:
    """The cost lines; the last one is the headline ratio."""
    med = statistics.median
    lines = [
        f"bridge path, drift in the ingest transaction ({result.database}, batches of {result.devices} devices' "
        f"windows, {result.windows} batches, {len(result.runs['plain'])} repeats; load average {load}):",
        "  per telemetry window, median (min-max) over the repeats, us:",
        f"  {'path':<11} {'CPU':>15} {'wall':>15} {'of CPU: GC':>15} {'drift CPU':>15}"
        + (f" {'db server CPU':>15}" if result.database == "postgresql" else ""),
    ]
    for path in PATHS:
        cpu = result.per_window(path, lambda r: r.cpu)
        wall = result.per_window(path, lambda r: r.wall)
        gcs = result.per_window(path, lambda r: r.gc)
        extra = _spread(result.extra(path)) if path != "plain" else "-"
        row = f"  {path:<11} {_spread(cpu):>15} {_spread(wall):>15} {_spread(gcs):>15} {extra:>15}"
        if result.database == "postgresql":
            row += f" {_spread(result.per_window(path, lambda r: r.server_cpu)):>15}"
        lines.append(row)
    batched = med(result.extra("batched"))
    per_window = med(result.extra("per-window"))
    verdict = "met" if batched <= TARGET_US else "not met"
    with_drift = med(result.per_window("batched", lambda r: r.cpu))
    without = med(result.per_window("plain", lambda r: r.cpu))
    lines += [
        f"  drift CPU per window, batched / per-window path: {batched / max(per_window, 1e-9):.2f} "
        f"({batched:.0f} vs {per_window:.0f} us)",
        f"  drift adds {batched:.0f} us CPU per telemetry window (target <= {TARGET_US:.0f} us: {verdict})",
        f"ratio {with_drift / max(without, 1e-9):.2f} CPU per window with drift / without "
        f"({with_drift:.0f} vs {without:.0f} us, {result.database})",
    ]
    return lines


def tmp_sqlite() -> tuple[tempfile.TemporaryDirectory[str], Callable[[str], str]]:
    tmp = tempfile.TemporaryDirectory(prefix="bench-drift-")
    return tmp, lambda name: f"sqlite+aiosqlite:///{tmp.name}/{name}.db"
