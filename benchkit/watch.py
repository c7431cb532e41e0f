"""What the bench watches while a fleet runs: each process's CPU and RSS, the registry's lag (device
time of a message -> the bridge taking it into a committed batch), the broker's stored messages and
the bridges' own status lines."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from schemas import msg_id_time

_STATUS = re.compile(
    r"bridge status msgs_per_s=(\S+) received=(\d+) stored=(\d+) dead_letters=\d+ dups=(\d+) backlog=(\d+) "
    r"escalations_answered=(\d+) escalations_expired=(\d+)"
)


@dataclass
class ProcSample:
    cpu_s: float
    rss: int
    runq_s: float = 0.0  # time its threads were runnable but waiting for a CPU (run_queue_wait)


def run_queue_wait(pid: int) -> float:
    """Seconds the threads of `pid` spent runnable but waiting for a CPU (Linux schedstat, field 2).

    A process that is "mostly idle" by its CPU share may in fact be waiting for a core the other
    processes hold: this tells the two apart (0.0 where /proc has no schedstat)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def proc_sample(pid: int) -> ProcSample:
    """CPU seconds (user + system, children included), RSS and run-queue wait of a process."""
    p = psutil.Process(pid)
    t = p.cpu_times()
    return ProcSample(t.user + t.system + t.children_user + t.children_system, p.memory_info().rss, run_queue_wait(pid))


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live children (a PostgreSQL server and its backends)."""
    p = psutil.Process(pid)
    total = 0.0
    for q in [p, *p.children(recursive=True)]:
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


class RegistryLag:
    """The lag of the newest messages the registry took (device clock and bridge clock are this machine's)."""

    def __init__(self, url: str) -> None:
        self.engine = create_async_engine(url)

    async def sample(self, newest: int = 300) -> float | None:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    text("SELECT msg_id, received_at FROM seen_messages ORDER BY received_at DESC LIMIT :n"),
                    {"n": newest},
                )
            ).all()
        lags = []
        for msg_id, received_at in rows:
            try:
                lags.append(float(received_at) - msg_id_time(msg_id))
            except ValueError:
                continue
        return statistics.median(lags) if lags else None

    async def scalar(self, sql: str) -> Any:
        async with self.engine.connect() as conn:
            return (await conn.execute(text(sql))).scalar()

    async def close(self) -> None:
        await self.engine.dispose()


class BrokerStore:
    """`$SYS/broker/store/messages/count` (the broker's sys_interval must be short)."""

    def __init__(self, host: str, port: int) -> None:
        self.count: int | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fleet-watch", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe("$SYS/broker/store/messages/count")
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.count = int(msg.payload)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class BridgeLog:
    """The last status line of a bridge's log file."""

    path: Path
    backlog: int = 0
    answered: int = 0
    expired: int = 0
    received: int = 0
    stored: int = 0
    dups: int = 0

    @property
    def handled(self) -> int:
        """Messages the bridge has finished with: stored, duplicates, escalations answered or expired."""
        return self.stored + self.dups + self.answered + self.expired

    def refresh(self) -> None:
        try:
            text_ = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return
        found = _STATUS.findall(text_)  # whole file: drift logs a line per device between status lines
        if found:
            _rate, received, stored, dups, backlog, answered, expired = found[-1]
            self.received, self.backlog, self.stored = int(received), int(backlog), int(stored)
            self.dups = int(dups)
            self.answered, self.expired = int(answered), int(expired)


@dataclass
class Series:
    """Samples over a run, judged in thirds."""

    values: list[tuple[float, float]] = field(default_factory=list)

    def add(self, at: float, value: float) -> None:
        self.values.append((at, value))

    def thirds(self) -> tuple[float, float]:
        """Median of the first and of the last third of the samples."""
        v = [x for _, x in self.values]
        if len(v) < 3:
            return (v[0], v[-1]) if v else (0.0, 0.0)
        k = len(v) // 3
        return statistics.median(v[:k]), statistics.median(v[-k:])

    def last(self) -> float:
        return self.values[-1][1] if self.values else 0.0

    def max(self) -> float:
        return max((x for _, x in self.values), default=0.0)
