"""Ingestion: device messages -> registry (and TSDB lines), acknowledged only once durably stored.

Messages arrive from the MQTT callback into an in-memory queue (bounded by the broker's Receive
Maximum, since nothing is acked before it is stored). One writer task takes whatever has accumulated
(up to `batch_max`), decodes each message against its topic, drops duplicates, writes the batch in one
transaction (group commit), hands the telemetry lines to the TSDB writer and only then PUBACKs the
whole batch. Invalid payloads become dead-letter rows in the same transaction and are acked too:
redelivering them would never make them valid.

Confirmations: after the commit, the seqs of everything the batch holds durably (new messages,
duplicates of stored ones, dead letters) go to the Confirmer (confirm.py), which tells each device
what it may delete from its outbox; status messages tell it each device's outbox epoch.

Duplicates: a bounded cache of recently stored msg_ids drops most redeliveries for free; the rest are
found by the registry's unique msg_id inside the batch's own transaction (INSERT ... ON CONFLICT DO
NOTHING RETURNING, `Batch.narrow`), so no pre-query is needed and two bridges that both took one
message (a redelivery to another session) store it and count it on the device exactly once.

What each message writes is built in cloud_bridge/ingest/rows.py; the subscription filters and the
recent-ids cache are in cloud_bridge/ingest/admission.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError

from cloud_bridge.config import IngestConfig
from cloud_bridge.drift.store import DriftRun, DriftStore, PendingAlert
from cloud_bridge.ingest.admission import RecentIds
from cloud_bridge.ingest.confirm import Confirmer, Key, seq_of
from cloud_bridge.ingest.rows import add_message, dead_letter_row, shift_times
from cloud_bridge.mqtt import Incoming
from cloud_bridge.registry import Batch, Registry
from cloud_bridge.tsdb import TsdbWriter
from cloud_bridge.workqueue import WorkQueue
from schemas.codec import decode_for_topic
from schemas.errors import DecodeError, TopicError
from schemas.messages import Envelope, Sample, Status
from schemas.tensor import decode_tensor
from schemas.topics import Topics

log = logging.getLogger(__name__)

_RETRY_MIN_S = 0.1
_RETRY_MAX_S = 5.0


@dataclass
class IngestStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    batches: int = 0
    commit_failures: int = 0
    future_ts: int = 0  # messages dated too far ahead of the bridge's clock (clamped or dead-lettered)
    # Where ingestion spends its time (seconds, monotonic): waiting for messages, building batches
    # (decode, dedup, rows), inside the registry commit (drift included), after it.
    idle_s: float = 0.0
    plan_s: float = 0.0
    commit_s: float = 0.0  # from a commit's start to its end (it overlaps the next plan)
    commit_wait_s: float = 0.0  # a planned batch waiting for the previous commit
    after_s: float = 0.0
    largest_batch: int = 0


@dataclass
class _Plan:
    """One batch on its way to the registry, and what follows its commit (TSDB lines, dedup ids)."""

    batch: Batch = field(default_factory=Batch)
    decoded: int = 0
    lines: list[str] = field(default_factory=list)
    new_ids: list[str] = field(default_factory=list)
    drift: DriftRun | None = None
    received_at: float = 0.0  # when the bridge took the batch (unix seconds, its own clock)
    confirm: dict[Key, list[int]] = field(default_factory=dict)  # seqs to confirm once committed
    samples: list[Sample] = field(default_factory=list)  # new samples, for the labelers' feed


class Ingestor:
    """Decodes, dedups and stores device messages in group-committed batches."""

    def __init__(
        self,
        topics: Topics,
        registry: Registry,
        config: IngestConfig,
        ack: Callable[[Incoming], bool],
        tsdb: TsdbWriter | None = None,
        drift: DriftStore | None = None,
        on_alerts: Callable[[Sequence[PendingAlert]], None] | None = None,
        confirmer: Confirmer | None = None,
        on_samples: Callable[[list[Sample]], None] | None = None,
    ) -> None:
        self._on_samples = on_samples
        self._drift = drift
        self._confirmer = confirmer
        self._on_alerts = on_alerts
        self._topics = topics
        self._registry = registry
        self._config = config
        self._ack = ack
        self._tsdb = tsdb
        self._queue: WorkQueue[Incoming] = WorkQueue()
        self._recent = RecentIds(config.dedup_cache)
        self._progress = asyncio.Condition()
        self._clock_warned: dict[str, float] = {}  # device -> when its clock was last reported ahead
        self.stats = IngestStats()

    def submit(self, message: Incoming) -> None:
        """Called from the MQTT callback: cheap, never blocks."""
        self._queue.put(message)
        self.stats.received += 1

    @property
    def backlog(self) -> int:
        return len(self._queue)

    async def close(self) -> None:
        """Stop after storing what has already arrived."""
        self._queue.close()

    async def run(self) -> None:
        """Take what has arrived, plan it while the previous batch commits, then commit it: one
        batch in the registry and one being planned at a time, committed (and acked) in order."""
        stats = self.stats
        committing: asyncio.Task[None] | None = None
        try:
            while True:
                t0 = time.perf_counter()
                if not await self._queue.ready():
                    return
                t1 = time.perf_counter()
                stats.idle_s += t1 - t0
                taken = self._queue.take(self._config.batch_max)
                stats.largest_batch = max(stats.largest_batch, len(taken))
                plan = self._plan(taken)
                t2 = time.perf_counter()
                stats.plan_s += t2 - t1
                if committing is not None:
                    await committing
                    stats.commit_wait_s += time.perf_counter() - t2
                committing = asyncio.create_task(self._store(taken, plan))
        finally:
            if committing is not None:
                await committing

    async def _store(self, taken: list[Incoming], plan: _Plan) -> None:
        stats = self.stats
        t1 = time.perf_counter()
        delay = _RETRY_MIN_S
        while True:
            try:
                await self._registry.commit_batch(plan.batch)
                break
            except SQLAlchemyError as exc:
                self.stats.commit_failures += 1
                log.error("registry commit failed messages=%d error=%s retry_s=%.1f", len(taken), exc, delay)
                if self._queue.closing:
                    # Not acked: the broker redelivers these to the next session.
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
        t2 = time.perf_counter()
        stats.commit_s += t2 - t1
        for msg_id in plan.new_ids:
            self._recent.add(msg_id)
        if self._confirmer is not None:
            for key, seqs in plan.confirm.items():
                self._confirmer.stored(key, seqs)
        if self._on_samples is not None and plan.samples:
            self._on_samples(plan.samples)
        lines = plan.lines
        if plan.drift is not None:
            lines.extend(plan.drift.lines)
            self._after_drift(plan.drift)
        if self._tsdb is not None and lines:
            self._tsdb.add(lines)
        self.stats.batches += 1
        self.stats.stored += len(plan.new_ids)
        self.stats.duplicates += plan.decoded - len(plan.new_ids)
        self.stats.dead_letters += len(plan.batch.dead_letters)
        for message in taken:
            self._ack(message)
        stats.after_s += time.perf_counter() - t2
        async with self._progress:
            self._progress.notify_all()

    def _after_drift(self, drift: DriftRun) -> None:
        for pending in drift.alerts:
            # Our own alert comes back on the alerts topic: its row is already stored.
            self._recent.add(pending.alert.msg_id)
        if drift.alerts and self._on_alerts is not None:
            self._on_alerts(drift.alerts)

    async def wait_for(self, predicate: Callable[[IngestStats], bool]) -> None:
        """Wait until `predicate(stats)` holds after some batch (for tests, benches and drains)."""
        async with self._progress:
            await self._progress.wait_for(lambda: predicate(self.stats))

    def _plan(self, taken: list[Incoming]) -> _Plan:
        """Decode, drop what this bridge stored recently, and build the batch for the rest; the
        registry's unique msg_id narrows it further inside the transaction (`Batch.narrow`)."""
        now = time.time()
        plan = _Plan(received_at=now)
        candidates: list[Envelope] = []
        in_batch: set[str] = set()
        for incoming in taken:
            try:
                message = decode_for_topic(self._topics, incoming.topic, incoming.payload)
                if isinstance(message, Sample):
                    # The archive keeps raw tensor bytes: refuse one whose bytes, shape and dtype disagree.
                    decode_tensor(message.input, allow_nonfinite=True)
            except DecodeError as exc:
                plan.batch.dead_letters.append(dead_letter_row(incoming, exc, now, self._config.dead_letter_max_bytes))
                self._confirm_dead_letter(plan, incoming)
                continue
            ahead = message.ts - now
            if ahead > self._config.max_future_s and not self._in_time(plan, incoming, message, ahead, now):
                continue
            plan.decoded += 1
            if message.seq is not None:
                plan.confirm.setdefault((message.fleet_id, message.device_id), []).append(message.seq)
            if isinstance(message, Status) and message.outbox_epoch and self._confirmer is not None:
                key = (message.fleet_id, message.device_id)
                self._confirmer.epoch_seen(key, message.outbox_epoch, message.order, message.accepts)
            if message.msg_id in self._recent or message.msg_id in in_batch:
                continue
            in_batch.add(message.msg_id)
            candidates.append(message)
        plan.batch.seen = [{"msg_id": m.msg_id, "received_at": now} for m in candidates]
        self._fill(plan, candidates)
        plan.batch.narrow = lambda fresh: self._narrow(plan, candidates, fresh)
        return plan

    def _in_time(self, plan: _Plan, incoming: Incoming, message: Envelope, ahead: float, now: float) -> bool:
        """A message dated `ahead` seconds in the future (a device clock running ahead): clamp its
        times to its arrival (True: store it) or dead-letter it (False); counted either way."""
        self.stats.future_ts += 1
        device = f"{message.fleet_id}/{message.device_id}"
        limit = self._config.max_future_s
        if self._config.future_ts == "dead_letter":
            reason = f"ts is {ahead:.0f} s ahead of the bridge's clock (limit [ingest] max_future_s = {limit:g})"
            exc = DecodeError(reason + ": the device's clock is wrong", field="$.ts", schema=None)
            plan.batch.dead_letters.append(dead_letter_row(incoming, exc, now, self._config.dead_letter_max_bytes))
            if message.seq is not None and self._confirmer is not None:
                plan.confirm.setdefault((message.fleet_id, message.device_id), []).append(message.seq)
            return False
        shift_times(message, -ahead)
        if self._clock_warned.get(device, 0.0) < now - 3600.0:
            self._clock_warned[device] = now
            while len(self._clock_warned) > 10_000:
                self._clock_warned.pop(next(iter(self._clock_warned)))
            log.warning(
                "device clock ahead device=%s ahead_s=%.0f: times clamped to arrival (limit [ingest] max_future_s=%g)",
                device,
                ahead,
                limit,
            )
        return True

    def _confirm_dead_letter(self, plan: _Plan, incoming: Incoming) -> None:
        """A dead letter is stored too: confirm it if its payload still names a seq (sending it again
        would never make it valid)."""
        if self._confirmer is None:
            return
        seq = seq_of(incoming.payload)
        if seq is None:
            return
        try:
            where = self._topics.parse_device(incoming.topic)
        except TopicError:
            return
        plan.confirm.setdefault((where.fleet_id, where.device_id), []).append(seq)

    def _narrow(self, plan: _Plan, candidates: list[Envelope], fresh: set[str]) -> None:
        """Keep the messages the registry had not stored yet (rebuilt only when that changes the plan:
        a redelivery, another bridge that took the same message, or a retry after one of those)."""
        keep = [m for m in candidates if m.msg_id in fresh]
        if [m.msg_id for m in keep] != plan.new_ids:
            self._fill(plan, keep)

    def _fill(self, plan: _Plan, messages: list[Envelope]) -> None:
        """(Re)build everything the batch writes for `messages` (drift scoring included)."""
        batch = plan.batch
        batch.rows, batch.results, batch.devices, batch.hooks, batch.features = {}, [], {}, [], {}
        plan.lines, plan.new_ids = [], []
        plan.samples = [m for m in messages if isinstance(m, Sample)]
        for message in messages:
            plan.new_ids.append(message.msg_id)
            add_message(batch, plan.lines if self._tsdb is not None else None, message, plan.received_at)
        # Drift is scored inside the same transaction, from the windows this batch stores.
        plan.drift = self._drift.start(batch) if self._drift is not None else None
