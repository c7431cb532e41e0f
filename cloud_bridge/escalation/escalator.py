"""Escalation answers: the larger cloud ONNX model labels inputs the edge was unsure about.

Requests arrive on `$share/{group}/{prefix}/+/+/escalate`. Those that arrive together are stacked into
one `session.run` (micro-batching), which runs in a worker thread so the event loop keeps receiving;
at most `max_concurrency` batches run at once. The reply goes to the MQTT 5 Response Topic with the
Correlation Data echoed, or to the payload's `reply_to` when the request came over MQTT 3.1.1.
Requests already past their deadline are skipped (the device has fallen back to its own answer).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from cloud_bridge.config import EscalationConfig
from cloud_bridge.errors import ModelError, MqttError
from cloud_bridge.mqtt import Incoming
from cloud_bridge.workqueue import WorkQueue
from schemas.codec import decode_for_topic, encode
from schemas.errors import DecodeError
from schemas.messages import EscalationReply, EscalationRequest, ModelRef, TopK
from schemas.msgid import new_msg_id
from schemas.tensor import decode_tensor
from schemas.topics import Channel, Topics

log = logging.getLogger(__name__)

TOPK = 3
Publish = Callable[[str, bytes, int, bytes | None], Awaitable[None]]
Ack = Callable[[Incoming], bool]


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    confidence: float
    topk: list[TopK]


class CloudModel:
    """An ONNX classifier with `labels` and `output_kind` in its metadata_props."""

    def __init__(self, path: Path, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        data = Path(path).read_bytes()
        options = ort.SessionOptions()
        # Tiny models: intra-op threads cost more in hand-offs than they save on 2 cores.
        options.intra_op_num_threads = 1
        available = set(ort.get_available_providers())
        usable = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(data, sess_options=options, providers=usable)
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.labels: tuple[str, ...] = tuple(json.loads(meta["labels"]))
        except (KeyError, ValueError) as exc:
            raise ModelError(f"{path}: metadata_props 'labels' is missing or not a JSON list: {exc}") from None
        self.output_kind = meta.get("output_kind", "probabilities")
        if self.output_kind not in ("logits", "probabilities"):
            raise ModelError(f"{path}: output_kind {self.output_kind!r} must be 'logits' or 'probabilities'")
        self.ref = ModelRef(
            name=meta.get("model_name", Path(path).stem),
            version=meta.get("model_version", "0"),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        self._input = self.session.get_inputs()[0]
        self._features = self._input.shape[-1] if isinstance(self._input.shape[-1], int) else None
        self.providers = tuple(self.session.get_providers())

    def prepare(self, array: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """One input as a (1, features) float32 row; raises ValueError if it does not fit the model."""
        row = np.asarray(array, dtype=np.float32).reshape(1, -1)
        if self._features is not None and row.shape[1] != self._features:
            raise ValueError(f"input has {row.shape[1]} values, the cloud model takes {self._features}")
        return row

    def predict(self, batch: npt.NDArray[np.float32]) -> list[Prediction]:
        """Classify a (N, features) batch (runs in a worker thread: ORT sessions are thread-safe)."""
        (out,) = self.session.run(None, {self._input.name: batch})
        scores = np.asarray(out, dtype=np.float64)
        if self.output_kind == "logits":
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores /= scores.sum(axis=1, keepdims=True)
        order = np.argsort(-scores, axis=1)[:, :TOPK]
        results = []
        for row, idx in zip(scores, order, strict=True):
            top = [TopK(label=self.labels[i], index=int(i), prob=float(min(1.0, max(0.0, row[i])))) for i in idx]
            results.append(Prediction(index=top[0].index, label=top[0].label, confidence=top[0].prob, topk=top))
        return results


@dataclass
class EscalationStats:
    received: int = 0
    answered: int = 0
    expired: int = 0
    invalid: int = 0
    publish_failed: int = 0
    errors: int = 0
    batches: int = 0


@dataclass
class _Pending:
    incoming: Incoming
    request: EscalationRequest
    row: npt.NDArray[np.float32]
    received: float


@dataclass
class AgreementCounts:
    """Edge top-1 vs cloud label per (fleet, device, edge model version), since the last flush."""

    counts: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)

    def record(self, request: EscalationRequest, cloud_label: str) -> None:
        key = (request.fleet_id, request.device_id, request.model.version)
        entry = self.counts.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += int(request.edge_topk[0].label == cloud_label)

    def take(self) -> list[tuple[tuple[str, str, str], tuple[int, int]]]:
        out = [(k, (v[0], v[1])) for k, v in self.counts.items()]
        self.counts.clear()
        return out


def escalation_filter(topics: Topics, share_group: str, shared: bool) -> str:
    topic_filter = topics.filter(Channel.ESCALATE)
    return Topics.shared(share_group, topic_filter) if shared else topic_filter


class Escalator:
    """Answers escalation requests with the cloud model."""

    def __init__(self, topics: Topics, model: CloudModel, config: EscalationConfig, publish: Publish, ack: Ack) -> None:
        self._topics = topics
        self.model = model
        self._config = config
        self._publish = publish
        self._ack = ack
        self._queue: WorkQueue[_Pending] = WorkQueue()
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._inflight: set[asyncio.Task[None]] = set()
        self.stats = EscalationStats()
        self.agreement = AgreementCounts()

    def submit(self, incoming: Incoming) -> None:
        """Called from the MQTT callback: validate cheaply and queue; bad requests are acked and dropped."""
        self.stats.received += 1
        try:
            message = decode_for_topic(self._topics, incoming.topic, incoming.payload)
            if not isinstance(message, EscalationRequest):
                raise DecodeError(f"expected an escalation request, got {type(message).__name__}")
            row = self.model.prepare(decode_tensor(message.input))
        except (DecodeError, ValueError) as exc:
            self.stats.invalid += 1
            log.warning("escalation request refused topic=%s error=%s", incoming.topic, exc)
            self._ack(incoming)
            return
        self._queue.put(_Pending(incoming, message, row, time.time()))

    async def close(self) -> None:
        self._queue.close()

    async def run(self) -> None:
        """Take batches off the queue until closed, then wait for the batches in flight."""
        while await self._queue.ready():
            await self._slots.acquire()
            batch = self._take_batch()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._answer(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        if self._inflight:
            await asyncio.gather(*self._inflight)

    def _take_batch(self) -> list[_Pending]:
        now = time.time()
        batch: list[_Pending] = []
        while self._queue.items and len(batch) < self._config.max_batch:
            pending = self._queue.items.popleft()
            if pending.request.deadline <= now:
                self.stats.expired += 1
                log.info(
                    "escalation expired device=%s request_id=%s late_s=%.3f",
                    pending.request.device_id,
                    pending.request.request_id,
                    now - pending.request.deadline,
                )
                self._ack(pending.incoming)
                continue
            batch.append(pending)
        return batch

    async def _answer(self, batch: list[_Pending]) -> None:
        try:
            inputs = np.concatenate([p.row for p in batch], axis=0)
            try:
                predictions: list[Prediction | None] = list(await asyncio.to_thread(self.model.predict, inputs))
            except Exception as exc:
                # ORT raises several unrelated types; the device must hear "error" now rather than time out.
                log.exception("cloud model failed batch=%d", len(batch))
                self.stats.errors += 1
                predictions = [None] * len(batch)
                error: str | None = f"cloud model failed: {exc}"[:1024]
            else:
                error = None
            self.stats.batches += 1
            done = time.time()
            await asyncio.gather(
                *(self._reply(p, pred, done, error) for p, pred in zip(batch, predictions, strict=True))
            )
        finally:
            self._slots.release()

    def _make_reply(
        self, pending: _Pending, prediction: Prediction | None, done: float, error: str | None
    ) -> EscalationReply:
        request = pending.request
        return EscalationReply(
            msg_id=new_msg_id(),
            fleet_id=request.fleet_id,
            device_id=request.device_id,
            ts=done,
            request_id=request.request_id,
            model=self.model.ref,
            label=None if prediction is None else prediction.label,
            index=None if prediction is None else prediction.index,
            confidence=None if prediction is None else prediction.confidence,
            topk=[] if prediction is None else prediction.topk,
            latency_ms=max(0.0, (done - pending.received) * 1000.0),
            error=(error or "no prediction") if prediction is None else None,
        )

    async def _reply(self, pending: _Pending, prediction: Prediction | None, done: float, error: str | None) -> None:
        request = pending.request
        reply = self._make_reply(pending, prediction, done, error)
        incoming = pending.incoming
        topic = incoming.response_topic or request.reply_to
        try:
            await self._publish(topic, encode(reply), 1, incoming.correlation_data)
        except MqttError as exc:
            # Not acked: the broker redelivers the request on the next connection.
            self.stats.publish_failed += 1
            log.warning(
                "escalation reply failed device=%s request_id=%s error=%s", request.device_id, request.request_id, exc
            )
            return
        self._ack(incoming)
        if prediction is not None:
            self.stats.answered += 1
            self.agreement.record(request, prediction.label)
