"""One simulated device: what its model sees (a per-device input profile and class mix), optional
injected drift, and every message it sends, built as the typed messages of schemas/.

A device at `hz` inferences per second finishes most inputs at the edge; a share is unsure and asked
of the cloud (escalate/1, answered or timed out after `escalation_timeout_s`), a smaller share is sent
as an uncertain sample (within the edge's budget of `max_per_minute`, 3 a minute by default). Final
answers wait up to `results_delay_s` (10 s, the edge's `[uplink] results_max_delay_s` default) or 256
answers to share a result/2 message; a telemetry window summarises every `telemetry_s` seconds (10 s:
the issue's profile, where the edge's default is now 30 s). Every message carries an outbox `seq` (confirmed delivery).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from schemas import (
    Answer,
    CommandAck,
    ConfidenceStats,
    EntropyStats,
    EscalationCounts,
    EscalationRequest,
    FeatureStats,
    LatencyStats,
    ModelRef,
    OutboxStats,
    Results,
    Sample,
    SampleCounts,
    Status,
    Telemetry,
    TopK,
    encode_tensor,
    new_msg_id,
)
from schemas.compact import ENCODING
from schemas.topics import Channel, Topics

LABELS = [str(i) for i in range(10)]
FEATURES = 64
MODEL = ModelRef(name="digits-edge", version="1.0.0", sha256="ab" * 32)


@dataclass(frozen=True)
class Profile:
    """What every simulated device does (the issue's realistic profile by default)."""

    hz: float = 1.0
    telemetry_s: float = 10.0
    escalate_share: float = 0.05
    sample_share: float = 0.02
    samples_per_minute: int = 3  # the edge's default sample budget
    results_delay_s: float = 10.0  # the edge's [uplink] results_max_delay_s default
    escalation_timeout_s: float = 2.0
    drift_share: float = 0.01  # devices whose inputs drift, from `drift_after_s` into the run
    drift_after_s: float = 30.0


@dataclass
class Window:
    """What the current telemetry window has counted."""

    start: float
    count: int = 0
    classes: dict[str, int] = field(default_factory=dict)
    paths: dict[str, int] = field(default_factory=dict)
    escalated: int = 0
    answered: int = 0
    timed_out: int = 0
    samples: int = 0


class Device:
    """One device's state; `rng` is shared by the devices of one simulator process."""

    def __init__(
        self, topics: Topics, fleet: str, name: str, profile: Profile, drifts: bool, rng: np.random.Generator
    ) -> None:
        self.topics, self.fleet, self.name, self.drifts = topics, fleet, name, drifts
        self.escalate_share = profile.escalate_share
        # Samples are unsure inputs too: a share of the escalated ones, as the edge's thresholds pick them.
        self.sample_given_escalate = min(1.0, profile.sample_share / max(profile.escalate_share, 1e-9))
        self.samples_per_minute = profile.samples_per_minute
        self.rng = rng
        self.model = MODEL
        self.mix: npt.NDArray[np.float64] = rng.dirichlet(np.full(10, 40.0))
        self.mean: npt.NDArray[np.float64] = rng.uniform(0, 16, FEATURES)
        self.std: npt.NDArray[np.float64] = rng.uniform(1, 6, FEATURES)
        self.epoch = f"{rng.integers(1 << 48):x}"
        self.seq = 0
        self.window_seq = 0
        self.pending: list[Answer] = []
        self.pending_since = 0.0
        self.sample_budget_at = 0.0
        self.sample_budget = 0
        self.drifting = False
        self.window = Window(time.time())
        self.inference = 0

    def topic(self, channel: Channel) -> str:
        return self.topics.device(self.fleet, self.name, channel)

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def status(self, online: bool, reason: str = "connected") -> Status:
        return Status(
            msg_id=new_msg_id(),
            fleet_id=self.fleet,
            device_id=self.name,
            ts=time.time(),
            seq=self._next_seq(),
            state="online" if online else "offline",
            reason=reason,  # type: ignore[arg-type]
            model=self.model,
            software="fleetsim",
            connection=1,
            outbox_epoch=self.epoch,
            accepts=[ENCODING],
            protocol="mqtt5",
        )

    def mix_now(self) -> npt.NDArray[np.float64]:
        """The class mix the device's inputs follow now (drift moves most of it onto one class)."""
        if self.drifting:
            return 0.4 * self.mix + 0.6 * np.eye(10)[sum(self.name.encode()) % 10]
        return self.mix

    def infer(self, now: float, label_index: int, u: float, u2: float, u3: float) -> tuple[str, float, bool, bool]:
        """One inference whose draws were made for the whole slot at once (`Fleet.draw`): the label
        from the class mix, and three uniforms for escalating, the confidence and sampling.
        Returns (label, confidence, escalate?, sample?)."""
        self.inference += 1
        label = LABELS[label_index]
        escalate = u < self.escalate_share
        confidence = 0.45 + 0.3 * u if escalate else 0.8 + 0.2 * u2
        sample = escalate and u3 < self.sample_given_escalate and self._take_sample(now)
        w = self.window
        w.count += 1
        w.classes[label] = w.classes.get(label, 0) + 1
        return label, confidence, escalate, sample

    def _take_sample(self, now: float) -> bool:
        if now - self.sample_budget_at >= 60.0:
            self.sample_budget_at, self.sample_budget = now, 0
        if self.sample_budget >= self.samples_per_minute:
            return False
        self.sample_budget += 1
        self.window.samples += 1
        return True

    def answer(self, inference_id: str, label: str, confidence: float, path: str, edge_label: str, ms: float) -> None:
        if not self.pending:
            self.pending_since = time.time()
        self.pending.append(
            Answer(
                inference_id=inference_id,
                label=label,
                index=int(label),
                confidence=confidence,
                path=path,  # type: ignore[arg-type]
                edge_label=edge_label,
                cloud_label=label if path == "cloud" else None,
                fallback_reason="timeout" if path == "edge_fallback" else None,
                latency_ms=ms,
            )
        )
        self.window.paths[path] = self.window.paths.get(path, 0) + 1

    def results(self, now: float, delay_s: float) -> Results | None:
        """The answers waiting to share a message, once the oldest waited `delay_s` or 256 are waiting."""
        if not self.pending or (len(self.pending) < 256 and now - self.pending_since < delay_s):
            return None
        answers, self.pending = self.pending[:256], self.pending[256:]
        return Results(
            msg_id=new_msg_id(),
            fleet_id=self.fleet,
            device_id=self.name,
            ts=time.time(),
            seq=self._next_seq(),
            model=self.model,
            answers=answers,
        )

    def escalation(self, request_id: str, label: str, confidence: float, deadline: float) -> EscalationRequest:
        x = np.clip(self.rng.normal(self.mean, self.std), 0, 16).astype(np.float32)
        return EscalationRequest(
            msg_id=new_msg_id(),
            fleet_id=self.fleet,
            device_id=self.name,
            ts=time.time(),
            request_id=request_id,
            model=self.model,
            input=encode_tensor(x.reshape(1, -1)),
            edge_topk=[TopK(label=label, index=int(label), prob=confidence)],
            deadline=deadline,
            reply_to=self.topic(Channel.ESCALATE_REPLY),
        )

    def sample(self, inference_id: str, label: str, confidence: float) -> Sample:
        x = np.clip(self.rng.normal(self.mean, self.std), 0, 16).astype(np.float32)
        second = LABELS[(int(label) + 1) % 10]
        return Sample(
            msg_id=new_msg_id(),
            fleet_id=self.fleet,
            device_id=self.name,
            ts=time.time(),
            seq=self._next_seq(),
            model=self.model,
            inference_id=inference_id,
            input=encode_tensor(x.reshape(1, -1)),
            predicted=label,
            topk=[
                TopK(label=label, index=int(label), prob=confidence),
                TopK(label=second, index=int(second), prob=0.2),
            ],
            entropy=1.2,
            margin=max(0.0, confidence - 0.2),
            reasons=["margin"],
        )

    def telemetry(self, now: float) -> Telemetry:
        """Close the current window and open the next."""
        w, self.window = self.window, Window(now)
        self.window_seq += 1
        shift = 3.0 * self.std if self.drifting else 0.0
        n = max(w.count, 1)
        noise = self.rng.normal(0, 0.05, FEATURES) * self.std / np.sqrt(n)
        return Telemetry(
            msg_id=new_msg_id(),
            fleet_id=self.fleet,
            device_id=self.name,
            ts=now,
            seq=self._next_seq(),
            model=self.model,
            window_start=w.start,
            window_end=now,
            window_seq=self.window_seq,
            count=w.count,
            latency_ms=LatencyStats(p50=0.4, p95=1.5, p99=30.0, max=60.0, mean=2.0),
            edge_latency_ms=LatencyStats(p50=0.3, p95=0.6, p99=0.9, max=1.5, mean=0.35),
            confidence=ConfidenceStats(mean=0.9 - (0.1 if self.drifting else 0.0), p05=0.55, min=0.4),
            entropy=EntropyStats(mean=0.3, p95=1.1, max=1.6),
            class_counts=dict(w.classes),
            paths=dict(w.paths),
            escalations=EscalationCounts(
                sent=w.escalated, answered=w.answered, timed_out=w.timed_out, agreed=w.answered // 2
            ),
            samples=SampleCounts(sent=w.samples),
            outbox=OutboxStats(depth=len(self.pending), delivery="confirmed"),
            features=FeatureStats(
                n=w.count,
                dims=FEATURES,
                mean=[float(v) for v in self.mean + shift + noise],
                std=[float(v) for v in self.std * (1.0 + 0.01 * self.rng.standard_normal(FEATURES))],
            ),
        )

    def ack(self, cmd_id: str, state: str, model: ModelRef | None, rollout_id: str | None) -> CommandAck:
        return CommandAck(
            msg_id=new_msg_id(),
            fleet_id=self.fleet,
            device_id=self.name,
            ts=time.time(),
            seq=self._next_seq(),
            cmd_id=cmd_id,
            state=state,  # type: ignore[arg-type]
            model=model,
            rollout_id=rollout_id,
        )
