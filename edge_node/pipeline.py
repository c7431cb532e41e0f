"""The inference pipeline: queue -> micro-batch -> model -> routing -> results, samples, escalations.

Inputs are taken from the queue as they come: when one waits alone it runs alone (batch-1
latency is not traded away), when many wait they run as one batch of up to `max_batch`. The model
runs in a worker thread so the event loop (and the MQTT keep-alive) never waits on it. Everything
the pipeline emits goes into the outbox in one `put_many` per batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_node.config import EdgeConfig
from edge_node.errors import InputRejected
from edge_node.escalation import EscalationResult, Escalations
from edge_node.model import Classifier
from edge_node.outbox import Outbox, OutMessage, Priority
from edge_node.routing import BatchDecision, decide, top_k
from edge_node.sampling import UncertaintySampler
from edge_node.sources import InputItem
from edge_node.telemetry import Window
from schemas import (
    Channel,
    EscalationReply,
    EscalationRequest,
    Result,
    Sample,
    encode,
    encode_tensor,
    new_msg_id,
    new_msg_ids,
)
from schemas.messages import FallbackReason, Path

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Final:
    """A final answer: the row, which path gave it, why it fell back, and the cloud's reply if any."""

    row: _Row
    path: Path
    reason: FallbackReason | None = None
    reply: EscalationReply | None = None


@dataclass(slots=True)
class _Row:
    """One input that went through the model, with what the model said."""

    item: InputItem
    x: npt.NDArray[Any]
    index: int
    confidence: float
    probs: npt.NDArray[np.float32]


class Pipeline:
    def __init__(
        self,
        config: EdgeConfig,
        classifier: Classifier,
        outbox: Outbox,
        escalations: Escalations,
        sampler: UncertaintySampler,
        window: Callable[[], Window],
        online: Callable[[], bool],
    ) -> None:
        self.config = config
        self.classifier = classifier
        self.outbox = outbox
        self.escalations = escalations
        self.sampler = sampler
        self._window = window
        self._online = online
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        topics = config.topics
        dev = config.device
        self._topic = {
            ch: topics.device(dev.fleet_id, dev.device_id, ch)
            for ch in (Channel.RESULTS, Channel.SAMPLES, Channel.ESCALATE, Channel.ESCALATE_REPLY)
        }
        self.processed = 0

    # ---- the loop ----------------------------------------------------------------------------
    async def run(self, queue: asyncio.Queue[InputItem]) -> None:
        """Process the queue until cancelled; escalations still waiting finish in `tasks`."""
        max_batch = self.config.model.max_batch if self.classifier.info.dynamic_batch else 1
        try:
            async with asyncio.TaskGroup() as tasks:
                while True:
                    items = [await queue.get()]
                    while len(items) < max_batch and not queue.empty():
                        items.append(queue.get_nowait())
                    try:
                        await self.process(items, tasks)
                    finally:
                        for _ in items:
                            queue.task_done()
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def process(self, items: list[InputItem], tasks: asyncio.TaskGroup) -> None:
        good, arrays = self._check(items)
        if not good:
            return
        batch = np.stack(arrays)
        loop = asyncio.get_running_loop()
        probs = await loop.run_in_executor(self._executor, self.classifier.predict, batch)
        decision = decide(probs, self.config.routing.confidence_threshold)
        self._window().add_batch(batch, decision.confidence, decision.entropy)
        out: list[OutMessage] = []
        out += self._samples(good, batch, decision)
        finals: list[_Final] = []
        tally = self._window().escalations
        for i, item in enumerate(good):
            row = _Row(item, batch[i], int(decision.top1[i]), float(decision.confidence[i]), probs[i])
            if decision.confident[i] or not self.config.routing.escalate:
                finals.append(_Final(row, "edge"))
            elif not self._online():
                tally.offline_fallback += 1
                finals.append(_Final(row, "edge_fallback", "offline"))
            else:
                request = self._escalate(row, tasks)
                if request is None:
                    tally.shed += 1
                    finals.append(_Final(row, "edge_fallback", "shed"))
                else:
                    out.append(request)
        out += self._finalize(finals, loop.time())
        if out:
            await self.outbox.put_many(out)
        self._done([f.row.item for f in finals], ok=True)
        self.processed += len(good)

    # ---- steps -------------------------------------------------------------------------------
    def _check(self, items: list[InputItem]) -> tuple[list[InputItem], list[npt.NDArray[Any]]]:
        good: list[InputItem] = []
        arrays: list[npt.NDArray[Any]] = []
        for item in items:
            try:
                if item.error is not None:
                    raise item.error
                if item.array is None:
                    raise InputRejected("undecodable", "no data")
                arrays.append(self.classifier.check_input(item.array))
                good.append(item)
            except InputRejected as exc:
                item.error = exc
                self._window().rejected[exc.reason] += 1
                log.warning(
                    "input rejected id=%s source=%s reason=%s detail=%s",
                    item.input_id,
                    item.source_ref,
                    exc.reason,
                    exc.detail,
                )
                self._done([item], ok=False)
        return good, arrays

    def _samples(self, items: list[InputItem], batch: npt.NDArray[Any], d: BatchDecision) -> list[OutMessage]:
        if self.config.sampling.max_per_minute == 0:
            return []
        out: list[OutMessage] = []
        now = time.monotonic()
        info = self.classifier.info
        dev = self.config.device
        for i in np.flatnonzero(self.sampler.candidates(d.entropy, d.margin)):
            if not self.sampler.admit(now):
                continue
            entropy, margin = float(d.entropy[i]), float(d.margin[i])
            sample = Sample(
                msg_id=new_msg_id(),
                fleet_id=dev.fleet_id,
                device_id=dev.device_id,
                ts=time.time(),
                model=info.ref,
                inference_id=items[i].input_id,
                input=encode_tensor(batch[i]),
                predicted=info.labels[int(d.top1[i])],
                topk=top_k(d.probs[i], info.labels, self.config.sampling.top_k),
                entropy=entropy,
                margin=margin,
                reasons=self.sampler.reasons(entropy, margin),
                source_ref=items[i].source_ref,
                truth=items[i].truth,
            )
            out.append(self._message(Channel.SAMPLES, Priority.SAMPLES, sample.msg_id, encode(sample)))
        return out

    def _escalate(self, row: _Row, tasks: asyncio.TaskGroup) -> OutMessage | None:
        """Reserve a slot and build the request; the wait for its reply runs as its own task."""
        request_id = row.item.input_id
        future = self.escalations.reserve(request_id)
        if future is None:
            return None
        loop = asyncio.get_running_loop()
        timeout = self.config.routing.escalation_timeout_s
        info = self.classifier.info
        dev = self.config.device
        now = time.time()
        request = EscalationRequest(
            msg_id=new_msg_id(),
            fleet_id=dev.fleet_id,
            device_id=dev.device_id,
            ts=now,
            request_id=request_id,
            model=info.ref,
            input=encode_tensor(row.x),
            edge_topk=top_k(row.probs, info.labels, self.config.sampling.top_k),
            deadline=now + timeout,
            reply_to=self._topic[Channel.ESCALATE_REPLY],
        )
        self._window().escalations.sent += 1
        tasks.create_task(self._await_reply(row, future, loop.time() + timeout))
        return self._message(
            Channel.ESCALATE,
            Priority.ESCALATION,
            request.msg_id,
            encode(request),
            expires_at=request.deadline,
            response_topic=request.reply_to,
            correlation_data=request_id.encode(),
        )

    async def _await_reply(self, row: _Row, future: asyncio.Future[EscalationReply], deadline: float) -> None:
        result = await self.escalations.wait(row.item.input_id, future, deadline)
        final = self._after_escalation(row, result)
        out = self._finalize([final], asyncio.get_running_loop().time())
        if out:
            await self.outbox.put_many(out)
        self._done([row.item], ok=True)

    def _after_escalation(self, row: _Row, result: EscalationResult) -> _Final:
        tally = self._window().escalations
        reply = result.reply
        if result.outcome == "answered" and reply is not None and reply.index is not None:
            tally.answered += 1
            if reply.index == row.index:
                tally.agreed += 1
            return _Final(row, "cloud", None, reply)
        if result.outcome == "timeout":
            tally.timed_out += 1
            return _Final(row, "edge_fallback", "timeout")
        tally.errors += 1
        return _Final(row, "edge_fallback", "error")

    def _finalize(self, finals: list[_Final], now_loop: float) -> list[OutMessage]:
        """Count final answers in the window and build their result messages."""
        if not finals:
            return []
        labels, ref = self.classifier.info.labels, self.classifier.info.ref
        fleet_id, device_id = self.config.device.fleet_id, self.config.device.device_id
        publish = self.config.routing.publish_results
        topic = self._topic[Channel.RESULTS]
        ids = new_msg_ids(len(finals)) if publish else []
        by_path: dict[str, list[tuple[str, float]]] = {}
        out: list[OutMessage] = []
        now = time.time()
        for n, final in enumerate(finals):
            row, reply = final.row, final.reply
            latency_ms = max((now_loop - row.item.accepted_at) * 1000.0, 0.0)
            edge_label = labels[row.index]
            label, index, confidence, cloud_label = edge_label, row.index, row.confidence, None
            if reply is not None and reply.label is not None and reply.index is not None:
                label, index, confidence, cloud_label = reply.label, reply.index, reply.confidence or 0.0, reply.label
            by_path.setdefault(final.path, []).append((label, latency_ms))
            if publish:
                result = Result(
                    msg_id=ids[n],
                    fleet_id=fleet_id,
                    device_id=device_id,
                    ts=now,
                    inference_id=row.item.input_id,
                    model=ref,
                    label=label,
                    index=index,
                    confidence=min(max(confidence, 0.0), 1.0),
                    path=final.path,
                    fallback_reason=final.reason,
                    edge_label=edge_label,
                    cloud_label=cloud_label,
                    latency_ms=latency_ms,
                    source_ref=row.item.source_ref,
                    truth=row.item.truth,
                )
                out.append(OutMessage(topic, encode(result), Priority.RESULTS, ids[n]))
        window = self._window()
        for path_name, rows in by_path.items():
            latencies = np.fromiter((r[1] for r in rows), np.float64, len(rows))
            window.add_final([r[0] for r in rows], path_name, latencies)
        return out

    def _message(self, channel: Channel, priority: Priority, msg_id: str, payload: bytes, **kw: Any) -> OutMessage:
        return OutMessage(topic=self._topic[channel], payload=payload, priority=priority, msg_id=msg_id, **kw)

    @staticmethod
    def _done(items: list[InputItem], ok: bool) -> None:
        for item in items:
            if item.on_done is not None:
                item.on_done(item, ok)
