"""Escalation answers: the larger cloud ONNX model labels inputs the edge was unsure about.

Requests arrive on `$share/{group}/{prefix}/+/+/escalate`. Those that arrive together are stacked into
one `session.run` (micro-batching), which runs in a worker thread so the event loop keeps receiving;
at most `max_concurrency` batches run the model at once (their replies then wait for their PUBACKs
outside that bound). The reply goes to the MQTT 5 Response Topic with the Correlation Data echoed,
or to the payload's `reply_to` when the request came over MQTT 3.1.1.
Requests already past their deadline are skipped (the device has fallen back to its own answer).
The model is loaded and checked by common/onnx.py, as the edge loads its own: a file that is not a
classifier stops the bridge at start with a message naming it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from cloud_bridge.config import EscalationConfig
from cloud_bridge.errors import ModelError, MqttError
from cloud_bridge.mqtt import Incoming
from cloud_bridge.workqueue import WorkQueue
from common.numeric import softmax
from common.onnx import CPU, load_model
from schemas.codec import decode_for_topic, encode
from schemas.compact import encode_compact, is_compact
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
    """The cloud's ONNX classifier (common/onnx.py loads and checks it, and reads its ModelCard)."""

    def __init__(self, path: Path, providers: tuple[str, ...] = (CPU,)) -> None:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"[escalation] model cannot be used: cannot read {path}: {exc}") from None
        try:
            model = load_model(path, error=ModelError, providers=providers, data=data)
        except ModelError as exc:
            raise ModelError(f"[escalation] model cannot be used: {exc}") from None
        self.session = model.session
        self.card = model.card
        self.signature = model.signature
        self.labels = model.card.labels
        self.ref = ModelRef(name=model.card.name, version=model.card.version, sha256=hashlib.sha256(data).hexdigest())
        self.providers = model.providers.active
        self._values = math.prod(self.signature.feature_shape)

    def prepare(self, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """One input as a batch of one, shaped and typed for the model; raises ValueError if it does not fit.

        Only the number of values must match: a device may send a flat row for an input of another shape."""
        if array.size != self._values:
            shape = list(self.signature.feature_shape)
            raise ValueError(f"input has {array.size} values, the cloud model takes {self._values} (shape {shape})")
        return np.asarray(array, dtype=self.signature.input_dtype).reshape(1, *self.signature.feature_shape)

    def predict(self, batch: npt.NDArray[Any]) -> list[Prediction]:
        """Classify a batch of prepared inputs (runs in a worker thread: ORT sessions are thread-safe)."""
        scores = self._scores(batch).reshape(len(batch), -1)
        if self.card.output_kind == "logits":
            probs = softmax(scores, np.float64)
        else:
            probs = np.asarray(scores, dtype=np.float64)
        order = np.argsort(-probs, axis=1)[:, :TOPK]
        results = []
        for row, idx in zip(probs, order, strict=True):
            top = [TopK(label=self.labels[i], index=int(i), prob=float(min(1.0, max(0.0, row[i])))) for i in idx]
            results.append(Prediction(index=top[0].index, label=top[0].label, confidence=top[0].prob, topk=top))
        return results

    def _scores(self, batch: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """The model's output for the batch; a model with a fixed batch size runs it in slices of that
        size, the last one padded with zeros (whose outputs are dropped)."""
        per_run = self.signature.batch
        if per_run is None or len(batch) == per_run:
            return self._run(batch)
        pad = np.zeros((-len(batch) % per_run, *batch.shape[1:]), dtype=batch.dtype)
        padded = np.concatenate([batch, pad])
        runs = [self._run(padded[i : i + per_run]) for i in range(0, len(padded), per_run)]
        return np.concatenate(runs)[: len(batch)]

    def _run(self, batch: npt.NDArray[Any]) -> npt.NDArray[Any]:
        (out,) = self.session.run([self.signature.output_name], {self.signature.input_name: batch})
        return np.asarray(out)


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
    row: npt.NDArray[Any]
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

    def restore(self, taken: list[tuple[tuple[str, str, str], tuple[int, int]]]) -> None:
        """Add back counts `take()` returned whose write failed (they go with the next flush)."""
        for key, (answered, agreed) in taken:
            entry = self.counts.setdefault(key, [0, 0])
            entry[0] += answered
            entry[1] += agreed


def escalation_filter(topics: Topics, share_group: str, shared: bool) -> str:
    topic_filter = topics.filter(Channel.ESCALATE)
    return Topics.shared(share_group, topic_filter) if shared else topic_filter


def _no_pause(fleet_id: str, device_id: str, model_version: str) -> None:
    return None


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
        # (fleet, device, edge model version) -> the pause a reply carries, if any (app.py wires
        # the registry's escalation advice in).
        self.pause_for: Callable[[str, str, str], float | None] = _no_pause

    def use_session(self, publish: Publish, ack: Ack) -> None:
        """Reply and acknowledge on another session from now on (the bridge moved escalations to its
        [mqtt] session); requests taken on the old one and not yet acknowledged come again there."""
        self._publish = publish
        self._ack = ack

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

    @property
    def backlog(self) -> int:
        """Requests queued, not yet in a batch."""
        return len(self._queue)

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
        expired, latest = 0, 0.0
        while self._queue.items and len(batch) < self._config.max_batch:
            pending = self._queue.items.popleft()
            if pending.request.deadline <= now:
                expired += 1
                latest = max(latest, now - pending.request.deadline)
                self._ack(pending.incoming)
                continue
            batch.append(pending)
        if expired:
            # One line per batch, not per request: an overloaded bridge expires thousands a second,
            # and a log line each made it slower still.
            self.stats.expired += expired
            log.info("escalations expired count=%d most_late_s=%.3f total=%d", expired, latest, self.stats.expired)
        return batch

    async def _answer(self, batch: list[_Pending]) -> None:
        # The slot bounds model runs, not replies: it is free again once the model answered, while the
        # replies wait for their PUBACKs (bounded by [mqtt] publish_window). Held until the PUBACKs,
        # two slots let two batches through per broker round trip, which a loaded bridge stretched
        # to seconds: most requests then expired in the queue.
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
        finally:
            self._slots.release()
        self.stats.batches += 1
        done = time.time()
        await asyncio.gather(*(self._reply(p, pred, done, error) for p, pred in zip(batch, predictions, strict=True)))

    def _make_reply(
        self, pending: _Pending, prediction: Prediction | None, done: float, error: str | None, *, lean: bool = False
    ) -> EscalationReply:
        """The reply; `lean` (a device on the compact encoding, i.e. one that counts its bytes)
        leaves out what a device does not use: the cloud model's identity and its top-k (about
        half the reply; the bridge records both itself)."""
        request = pending.request
        reply = EscalationReply(
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
            pause_s=self.pause_for(request.fleet_id, request.device_id, request.model.version),
        )
        if lean:
            confidence = None if reply.confidence is None else float(np.float32(reply.confidence))
            reply = msgspec.structs.replace(
                reply, model=None, topk=[], confidence=confidence, latency_ms=float(np.float32(reply.latency_ms))
            )
        return reply

    async def _reply(self, pending: _Pending, prediction: Prediction | None, done: float, error: str | None) -> None:
        request = pending.request
        incoming = pending.incoming
        compact = is_compact(incoming.payload)
        reply = self._make_reply(pending, prediction, done, error, lean=compact)
        # Always the device's own reply topic, whatever Response Topic or reply_to it named: a device
        # must not be able to make the bridge publish anywhere else. The reply is in the request's
        # encoding (a device that wrote compact reads it).
        topic = self._topics.device(request.fleet_id, request.device_id, Channel.ESCALATE_REPLY)
        payload = encode_compact(reply) if compact else encode(reply)
        try:
            await self._publish(topic, payload, 1, incoming.correlation_data)
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
