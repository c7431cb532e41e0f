"""Ingestion: device messages -> registry (and TSDB lines), acknowledged only once durably stored.

Messages arrive from the MQTT callback into an in-memory queue (bounded by the broker's Receive
Maximum, since nothing is acked before it is stored). One writer task takes whatever has accumulated
(up to `batch_max`), decodes each message against its topic, drops duplicates, writes the batch in one
transaction (group commit), hands the telemetry lines to the TSDB writer and only then PUBACKs the
whole batch. Invalid payloads become dead-letter rows in the same transaction and are acked too:
redelivering them would never make them valid.

Duplicates: a bounded cache of recently stored msg_ids drops most redeliveries for free; the rest are
found by the registry's unique msg_id inside the batch's own transaction (INSERT ... ON CONFLICT DO
NOTHING RETURNING, `Batch.narrow`), so no pre-query is needed and two bridges that both took one
message (a redelivery to another session) store it and count it on the device exactly once.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError

from cloud_bridge.config import IngestConfig
from cloud_bridge.drift.store import DriftRun, DriftStore, PendingAlert
from cloud_bridge.mqtt import Incoming
from cloud_bridge.registry import (
    AlertRow,
    Batch,
    CommandAckRow,
    Registry,
    ResultRow,
    SampleRow,
    TelemetryRow,
)
from cloud_bridge.tsdb.lines import TsdbWriter, status_line, telemetry_lines
from cloud_bridge.workqueue import WorkQueue
from schemas.codec import decode_for_topic, to_builtins
from schemas.errors import DecodeError
from schemas.messages import Alert, Answer, CommandAck, Envelope, Result, Results, Sample, Status, Telemetry
from schemas.tensor import decode_tensor
from schemas.topics import Channel, Topics

log = logging.getLogger(__name__)

_RETRY_MIN_S = 0.1
_RETRY_MAX_S = 5.0

INGEST_CHANNELS = (Channel.STATUS, Channel.TELEMETRY, Channel.SAMPLES, Channel.RESULTS, Channel.CMD_ACK)


def ingest_filters(topics: Topics, share_group: str, shared: bool) -> list[str]:
    """The subscription filters of ingestion (shared among bridges when `shared`).

    Status is never shared: brokers do not deliver retained messages to shared subscriptions
    (MQTT 5 spec 4.8.2), so a bridge started after the devices would never learn who is online.
    Every bridge takes every status message instead; they are few, and the msg_id dedup makes
    the copies harmless.
    """
    filters = [topics.filter(ch) for ch in INGEST_CHANNELS] + [topics.alerts_filter()]
    status = topics.filter(Channel.STATUS)
    return [Topics.shared(share_group, f) if shared and f != status else f for f in filters]


@dataclass
class IngestStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    batches: int = 0
    commit_failures: int = 0


@dataclass
class _Plan:
    """One batch on its way to the registry, and what follows its commit (TSDB lines, dedup ids)."""

    batch: Batch = field(default_factory=Batch)
    decoded: int = 0
    lines: list[str] = field(default_factory=list)
    new_ids: list[str] = field(default_factory=list)
    drift: DriftRun | None = None
    received_at: float = 0.0  # when the bridge took the batch (unix seconds, its own clock)


class RecentIds:
    """A bounded set of recently committed msg_ids (the registry's unique key is the backstop)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._ids

    def add(self, msg_id: str) -> None:
        self._ids[msg_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)


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
    ) -> None:
        self._drift = drift
        self._on_alerts = on_alerts
        self._topics = topics
        self._registry = registry
        self._config = config
        self._ack = ack
        self._tsdb = tsdb
        self._queue: WorkQueue[Incoming] = WorkQueue()
        self._recent = RecentIds(config.dedup_cache)
        self._progress = asyncio.Condition()
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
        while await self._queue.ready():
            await self._handle(self._queue.take(self._config.batch_max))

    async def _handle(self, taken: list[Incoming]) -> None:
        plan = self._plan(taken)
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
        for msg_id in plan.new_ids:
            self._recent.add(msg_id)
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
                plan.batch.dead_letters.append(self._dead_letter(incoming, exc, now))
                continue
            plan.decoded += 1
            if message.msg_id in self._recent or message.msg_id in in_batch:
                continue
            in_batch.add(message.msg_id)
            candidates.append(message)
        plan.batch.seen = [{"msg_id": m.msg_id, "received_at": now} for m in candidates]
        self._fill(plan, candidates)
        plan.batch.narrow = lambda fresh: self._narrow(plan, candidates, fresh)
        return plan

    def _narrow(self, plan: _Plan, candidates: list[Envelope], fresh: set[str]) -> None:
        """Keep the messages the registry had not stored yet (rebuilt only when that changes the plan:
        a redelivery, another bridge that took the same message, or a retry after one of those)."""
        keep = [m for m in candidates if m.msg_id in fresh]
        if [m.msg_id for m in keep] != plan.new_ids:
            self._fill(plan, keep)

    def _fill(self, plan: _Plan, messages: list[Envelope]) -> None:
        """(Re)build everything the batch writes for `messages` (drift scoring included)."""
        batch = plan.batch
        batch.rows, batch.devices, batch.hooks = {}, {}, []
        plan.lines, plan.new_ids = [], []
        for message in messages:
            plan.new_ids.append(message.msg_id)
            self._add_message(batch, plan.lines, message, plan.received_at)
        # Drift is scored inside the same transaction, from the windows this batch stores.
        plan.drift = self._drift.start(batch) if self._drift is not None else None

    def _dead_letter(self, incoming: Incoming, exc: DecodeError, now: float) -> dict[str, object]:
        limit = self._config.dead_letter_max_bytes
        log.info("dead letter topic=%s field=%s reason=%s", incoming.topic, exc.field, exc.reason[:200])
        return {
            "topic": incoming.topic[:1024],
            "reason": exc.reason[:2048],
            "field": exc.field[:256],
            "raw": bytes(incoming.payload[:limit]),
            "raw_size": len(incoming.payload),
            "received_at": now,
        }

    def _add_message(self, batch: Batch, lines: list[str], message: Envelope, received_at: float) -> None:
        delta = batch.device(message.fleet_id, message.device_id)
        delta.messages += 1
        delta.last_seen = max(delta.last_seen, message.ts)
        base = {"msg_id": message.msg_id, "fleet_id": message.fleet_id, "device_id": message.device_id}
        if isinstance(message, Telemetry):
            delta.telemetry_windows += 1
            delta.model = (message.model.name, message.model.version, message.model.sha256)
            # Not `delta.online = True`: status messages alone move a known device's online state.
            # Telemetry can be dealt to another bridge and committed after this device's last will,
            # and would flip it back online (DeviceDelta.online).
            batch.add_row(TelemetryRow, telemetry_row(base, message))
            lines.extend(telemetry_lines(message))
        elif isinstance(message, Status):
            online = message.state == "online"
            order, before = message.order, delta.status_order
            # Within a batch too, a status older (lower order) than one already taken is history:
            # the time series gets it, the device row does not (Registry orders across batches).
            if order is None or before is None or order >= before:
                delta.online = online
                if order is not None:  # >= before, by the condition above
                    delta.status_order = order
                if message.model is not None:
                    delta.model = (message.model.name, message.model.version, message.model.sha256)
            model, version = ("", "") if message.model is None else (message.model.name, message.model.version)
            # Stamped when the bridge took it, not with the status's ts: a last will's ts is when the
            # device prepared it, at CONNECT, before that connection's birth and telemetry, so
            # Grafana's "last status" of a dead device would be online. One clock (the bridge's)
            # for births and wills keeps a takeover's will before the next birth whatever the
            # device's clock says; status messages reach every bridge in the broker's order.
            lines.append(status_line(message.fleet_id, message.device_id, online, received_at, model, version))
        elif isinstance(message, Sample):
            delta.samples += 1
            batch.add_row(SampleRow, _sample_row(base, message))
        elif isinstance(message, Results):
            delta.results += len(message.answers)
            version = message.model.version
            for seq, answer in enumerate(message.answers):
                batch.add_row(ResultRow, _result_row(base, seq, version, answer, message.ts))
        elif isinstance(message, Result):  # result/1, from devices on older software
            delta.results += 1
            batch.add_row(ResultRow, _result_row(base, 0, message.model.version, message, message.ts))
        elif isinstance(message, CommandAck):
            batch.add_row(
                CommandAckRow,
                {**base, "cmd_id": message.cmd_id, "state": message.state, "reason": message.reason, "ts": message.ts},
            )
        elif isinstance(message, Alert):
            batch.add_row(AlertRow, _alert_row(base, message))


def telemetry_row(base: dict[str, str], m: Telemetry) -> dict[str, object]:
    """The registry row of a telemetry window; `base` holds its msg_id, fleet_id and device_id."""
    return {
        **base,
        "model_name": m.model.name,
        "model_version": m.model.version,
        "window_start": m.window_start,
        "window_end": m.window_end,
        "count": m.count,
        "body": to_builtins(m),
    }


def _sample_row(base: dict[str, str], m: Sample) -> dict[str, object]:
    return {
        **base,
        "model_name": m.model.name,
        "model_version": m.model.version,
        "inference_id": m.inference_id,
        "dtype": m.input.dtype,
        "shape": list(m.input.shape),
        # Already checked by decode_tensor in _build.
        "tensor": base64.b64decode(m.input.data),
        "topk": [{"label": t.label, "index": t.index, "prob": t.prob} for t in m.topk],
        "entropy": m.entropy,
        "margin": m.margin,
        "reasons": list(m.reasons),
        "predicted": m.predicted,
        "truth": m.truth,
        "ts": m.ts,
        "model_sha256": m.model.sha256,
        "source_ref": m.source_ref,
        "received_at": time.time(),
    }


def _result_row(base: dict[str, str], seq: int, version: str, a: Answer | Result, ts: float) -> dict[str, object]:
    """One answer's row; `seq` is its place in its message (the key is msg_id + seq)."""
    return {
        **base,
        "seq": seq,
        "inference_id": a.inference_id,
        "model_version": version,
        "label": a.label,
        "path": a.path,
        "confidence": a.confidence,
        "truth": a.truth,
        "ts": ts,
    }


def _alert_row(base: dict[str, str], m: Alert) -> dict[str, object]:
    return {
        **base,
        "alert_id": m.alert_id,
        "kind": m.kind,
        "state": m.state,
        "model_version": m.model.version,
        "score": m.score,
        "threshold": m.threshold,
        "detail": m.detail,
        "ts": m.ts,
    }
