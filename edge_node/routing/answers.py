"""What the routing of a batch sends: result/2 answers, samples and escalation requests, as outbox
messages on the device's topics.

A batch's answers leave as one result/2 message (RESULTS_PER_MESSAGE answers at most), not one
message per input. Every final answer is also counted in the telemetry window, by path; the
answers themselves are built only when results are published (`[routing] publish_results`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_node.config import EdgeConfig
from edge_node.inference.model import ModelInfo
from edge_node.input.intake import InputItem
from edge_node.routing.confidence import BatchDecision, top_k
from edge_node.routing.sampling import UncertaintySampler
from edge_node.telemetry import Window
from edge_node.uplink.budget import Spend
from edge_node.uplink.outbox import OutMessage, Priority
from edge_node.uplink.wire import Wire
from schemas import (
    Answer,
    Channel,
    EscalationReply,
    EscalationRequest,
    Results,
    Sample,
    encode_tensor,
    new_msg_id,
)
from schemas.messages import FallbackReason, Path

# Answers per results message: a batch of max_batch (<= 4096) inputs may need several, each well
# under the codec's 1 MiB limit for result/2 (an answer is at most ~800 bytes).
RESULTS_PER_MESSAGE = 256


def _float32(x: float) -> float:
    """What an answer reports: float32's 7 digits, which the compact encoding writes in 4 bytes
    instead of 9 (schemas/compact_columns.py); a confidence or a latency needs no more."""
    return float(np.float32(x))


@dataclass(slots=True)
class Row:
    """One input that went through the model, with what the model said."""

    item: InputItem
    info: ModelInfo  # the model that ran this input, even if another is active by the time it ends
    x: npt.NDArray[Any]
    index: int
    confidence: float
    probs: npt.NDArray[np.float32]


@dataclass(slots=True)
class Final:
    """A final answer: the row, which path gave it, why it fell back, and the cloud's reply if any."""

    row: Row
    path: Path
    reason: FallbackReason | None = None
    reply: EscalationReply | None = None


class AnswerBuilder:
    """Builds the answers and messages of one device (its topics, its telemetry window)."""

    def __init__(
        self, config: EdgeConfig, sampler: UncertaintySampler, window: Callable[[], Window], wire: Wire
    ) -> None:
        self.config = config
        self.sampler = sampler
        self._window = window
        self.wire = wire

    def edge_answers(
        self, items: list[InputItem], top1: list[int], confidence: list[float], info: ModelInfo, now_loop: float
    ) -> list[Answer]:
        """Answers final at the edge (confident, or escalation off): the hot path, built in one pass."""
        if not items:
            return []
        labels = [info.labels[k] for k in top1]
        latency = np.array([now_loop - item.accepted_at for item in items], np.float64) * 1000.0
        np.maximum(latency, 0.0, out=latency)
        self._window().add_final(labels, "edge", latency)
        if not self.config.routing.publish_results:
            return []
        latencies = latency.astype(np.float32).tolist()
        return [
            Answer(
                inference_id=item.input_id,
                label=label,
                index=index,
                confidence=conf,
                path="edge",
                edge_label=label,
                latency_ms=latency,
                source_ref=item.source_ref,
                truth=item.truth,
            )
            for item, label, index, conf, latency in zip(items, labels, top1, confidence, latencies, strict=True)
        ]

    def final_answers(self, finals: list[Final], now_loop: float) -> list[Answer]:
        """Count final answers that did not take the hot path (fallbacks, cloud replies) in the
        window, and build them (none when results are not published)."""
        by_path: dict[str, tuple[list[str], list[float]]] = {}
        answers: list[Answer] = []
        publish = self.config.routing.publish_results
        for final in finals:
            row, reply = final.row, final.reply
            latency_ms = max((now_loop - row.item.accepted_at) * 1000.0, 0.0)
            edge_label = row.info.labels[row.index]
            label, index, confidence, cloud_label = edge_label, row.index, row.confidence, None
            if reply is not None and reply.label is not None and reply.index is not None:
                label, index, confidence, cloud_label = reply.label, reply.index, reply.confidence or 0.0, reply.label
            labels, latencies = by_path.setdefault(final.path, ([], []))
            labels.append(label)
            latencies.append(latency_ms)
            if publish:
                answers.append(
                    Answer(
                        inference_id=row.item.input_id,
                        label=label,
                        index=index,
                        confidence=_float32(min(max(confidence, 0.0), 1.0)),
                        path=final.path,
                        fallback_reason=final.reason,
                        edge_label=edge_label,
                        cloud_label=cloud_label,
                        latency_ms=_float32(latency_ms),
                        source_ref=row.item.source_ref,
                        truth=row.item.truth,
                    )
                )
        window = self._window()
        for path_name, (labels, latencies) in by_path.items():
            window.add_final(labels, path_name, np.array(latencies, np.float64))
        return answers

    def results(self, info: ModelInfo, answers: list[Answer]) -> list[OutMessage]:
        """The result/2 messages of answers given by one model, RESULTS_PER_MESSAGE at most each;
        none when the daily byte budget holds results back (the telemetry window counts them)."""
        if answers and not self.wire.budget.allows(Spend.RESULTS):
            self.wire.budget.hold(Channel.RESULTS.value, len(answers))
            return []
        dev = self.config.device
        now = time.time()
        out: list[OutMessage] = []
        for start in range(0, len(answers), RESULTS_PER_MESSAGE):
            message = Results(
                msg_id=new_msg_id(),
                fleet_id=dev.fleet_id,
                device_id=dev.device_id,
                ts=now,
                model=info.ref,
                answers=answers[start : start + RESULTS_PER_MESSAGE],
            )
            out.append(self.wire.out(Channel.RESULTS, message, Priority.RESULTS))
        return out

    def samples(
        self, items: list[InputItem], batch: npt.NDArray[Any], d: BatchDecision, info: ModelInfo
    ) -> list[OutMessage]:
        """The uncertain inputs of a batch the sampler's budget admits, as sample messages."""
        if self.config.sampling.max_per_minute == 0:
            return []
        out: list[OutMessage] = []
        now = time.monotonic()
        dev = self.config.device
        budget = self.wire.budget
        for i in np.flatnonzero(self.sampler.candidates(d.entropy, d.margin)):
            if not budget.allows(Spend.SAMPLES):
                budget.hold(Channel.SAMPLES.value)
                continue
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
            out.append(self.wire.out(Channel.SAMPLES, sample, Priority.SAMPLES))
        return out

    def escalation(self, row: Row, now: float, deadline: float) -> OutMessage:
        """The request asking the cloud model about `row` (its input id is the request id); the
        reply comes on the device's escalate_reply topic, matched by correlation data."""
        info = row.info
        dev = self.config.device
        request_id = row.item.input_id
        request = EscalationRequest(
            msg_id=new_msg_id(),
            fleet_id=dev.fleet_id,
            device_id=dev.device_id,
            ts=now,
            request_id=request_id,
            model=info.ref,
            input=encode_tensor(row.x),
            edge_topk=top_k(row.probs, info.labels, self.config.sampling.top_k),
            deadline=deadline,
            reply_to=self.wire.topic[Channel.ESCALATE_REPLY],
        )
        return self.wire.out(
            Channel.ESCALATE,
            request,
            Priority.ESCALATION,
            expires_at=request.deadline,
            response_topic=request.reply_to,
            correlation_data=request_id.encode(),
        )
