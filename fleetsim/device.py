"""The simulated devices of one simulator process: per-device state, and the messages they send.

What varies per device: its inputs' class mix (Dirichlet around uniform) and feature profile (a mean
and spread per feature), its outbox epoch and seqs, its inference ids; drifting devices move most
of their class mix onto one class and shift their features by three spreads. Counts of the current
telemetry window live in arrays over all devices (`Population`), so a slot's inferences are counted
in a few numpy calls; what a device has waiting (answers for its next result/2, messages the cloud
has not confirmed yet) lives on its `Device`.

Every message is the typed message of schemas/ (`Status`, `Results`, `Telemetry`, ...), encoded by
fleetsim/wire.py into the compact frame an edge node would send; `ts` and the UUIDv7 msg_id carry
the time the message was scheduled, so the lag a bridge or the bench measures includes the
simulator's own lateness.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fleetsim import wire
from fleetsim.profile import Profile
from schemas import (
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
    Tensor,
    TopK,
    new_msg_id,
)
from schemas.compact import ENCODING, encode_compact
from schemas.topics import Channel, Topics

# Unconfirmed messages remembered per device: over an hour of this profile's messages, so a bridge
# that never confirms does not grow the simulator's memory without bound.
MAX_TRACKED = 1000
CLASSES = 10
FEATURES = 64
MODEL = ModelRef(name="digits-edge", version="1.0.0", sha256="ab" * 32)
_LATENCY = LatencyStats(p50=0.4, p95=1.5, p99=30.0, max=60.0, mean=2.0)
_EDGE_LATENCY = LatencyStats(p50=0.3, p95=0.6, p99=0.9, max=1.5, mean=0.375)
_ENTROPY = EntropyStats(mean=0.3, p95=1.1, max=1.625)
# The topics a simulated device publishes or subscribes to.
CHANNELS = (
    Channel.STATUS,
    Channel.RESULTS,
    Channel.TELEMETRY,
    Channel.SAMPLES,
    Channel.ESCALATE,
    Channel.ESCALATE_REPLY,
    Channel.CMD,
    Channel.CMD_ACK,
    Channel.CONFIRM,
    Channel.CLOCK,
    Channel.CLOCK_REPLY,
)
PUBLISHED = (
    Channel.STATUS,
    Channel.RESULTS,
    Channel.TELEMETRY,
    Channel.SAMPLES,
    Channel.ESCALATE,
    Channel.CMD_ACK,
    Channel.CLOCK,
)


def ns(t: float) -> int:
    return int(t * 1e9)


class Device:
    """One device's identity, outbox numbering, waiting answers and unconfirmed messages."""

    __slots__ = (
        "drifting",
        "epoch",
        "fleet",
        "index",
        "inference_prefix",
        "model",
        "name",
        "pending",
        "pending_since",
        "sample_budget",
        "sample_budget_at",
        "seq",
        "topic",
        "unconfirmed",
        "window_seq",
        "wire_topic",
    )

    def __init__(self, topics: Topics, fleet: str, name: str, index: int, epoch: str) -> None:
        self.fleet, self.name, self.index, self.epoch = fleet, name, index, epoch
        # Validated once (the status topic); the others differ only in their last level.
        base = topics.device(fleet, name, Channel.STATUS)[: -len(Channel.STATUS.value)]
        self.topic = {ch: base + ch.value for ch in CHANNELS}
        self.wire_topic = {ch: wire.topic_field(self.topic[ch]) for ch in PUBLISHED}
        self.inference_prefix = f"{name}-"
        self.model = MODEL
        self.seq = 0
        self.window_seq = 0
        self.pending: list[wire.Row] = []
        self.pending_since = 0.0
        self.sample_budget_at = 0.0
        self.sample_budget = 0
        self.drifting = False
        self.unconfirmed: dict[int, float] = {}  # seq -> scheduled time, until a confirm/1 names it

    def next_seq(self, at: float, track: bool) -> int:
        self.seq += 1
        if track and len(self.unconfirmed) < MAX_TRACKED:
            self.unconfirmed[self.seq] = at
        return self.seq

    def take_sample(self, now: float, per_minute: int) -> bool:
        """Whether the edge's sample budget (`per_minute` in any minute) lets one more through."""
        if now - self.sample_budget_at >= 60.0:
            self.sample_budget_at, self.sample_budget = now, 0
        if self.sample_budget >= per_minute:
            return False
        self.sample_budget += 1
        return True

    def status(self, now: float, online: bool, track: bool) -> bytes:
        message = Status(
            msg_id=new_msg_id(ns(now)),
            fleet_id=self.fleet,
            device_id=self.name,
            ts=now,
            seq=self.next_seq(now, track),
            state="online" if online else "offline",
            reason="connected" if online else "shutdown",
            model=self.model,
            software="fleetsim",
            connection=1,
            outbox_epoch=self.epoch,
            accepts=[ENCODING],
            protocol="mqtt5",
        )
        return wire.status_frame(message)

    def results(self, now: float, limit: int, track: bool) -> bytes:
        """The frame of up to `limit` waiting answers (the caller checked some are due)."""
        rows, self.pending = self.pending[:limit], self.pending[limit:]
        self.pending_since = now if self.pending else 0.0
        envelope = Results(
            msg_id=new_msg_id(ns(now)),
            fleet_id=self.fleet,
            device_id=self.name,
            ts=now,
            seq=self.next_seq(now, track),
            model=self.model,
            answers=[],
        )
        return wire.results_frame(envelope, self.inference_prefix, rows)

    def escalation(self, now: float, number: int, label: int, confidence: float, data: bytes, timeout: float) -> bytes:
        request = EscalationRequest(
            msg_id=new_msg_id(ns(now)),
            fleet_id=self.fleet,
            device_id=self.name,
            ts=now,
            request_id=f"{self.inference_prefix}{number}",
            model=self.model,
            input=Tensor(dtype="float32", shape=[1, FEATURES], data=data),
            edge_topk=[TopK(label=str(label), index=label, prob=confidence)],
            deadline=now + timeout,
            reply_to=self.topic[Channel.ESCALATE_REPLY],
        )
        return wire.escalation_frame(request)

    def sample(self, now: float, number: int, label: int, confidence: float, data: bytes, track: bool) -> bytes:
        second = (label + 1) % CLASSES
        message = Sample(
            msg_id=new_msg_id(ns(now)),
            fleet_id=self.fleet,
            device_id=self.name,
            ts=now,
            seq=self.next_seq(now, track),
            model=self.model,
            inference_id=f"{self.inference_prefix}{number}",
            input=Tensor(dtype="float32", shape=[1, FEATURES], data=data),
            predicted=str(label),
            topk=[
                TopK(label=str(label), index=label, prob=confidence),
                TopK(label=str(second), index=second, prob=0.25),
            ],
            entropy=1.25,
            margin=max(0.0, confidence - 0.25),
            reasons=["margin"],
        )
        return wire.sample_frame(message)

    def telemetry(self, now: float, counts: WindowCounts, mean: bytes, std: bytes, track: bool) -> bytes:
        """The window that closes now (its counts and start in `counts`)."""
        self.window_seq += 1
        classes = {str(k): n for k, n in enumerate(counts.classes) if n}
        paths = {p: n for p, n in zip(("edge", "cloud", "edge_fallback"), counts.paths, strict=True) if n}
        window = Telemetry(
            msg_id=new_msg_id(ns(now)),
            fleet_id=self.fleet,
            device_id=self.name,
            ts=now,
            seq=self.next_seq(now, track),
            model=self.model,
            window_start=counts.start,
            window_end=now,
            window_seq=self.window_seq,
            count=counts.count,
            latency_ms=_LATENCY,
            edge_latency_ms=_EDGE_LATENCY,
            confidence=ConfidenceStats(mean=0.8125 if self.drifting else 0.90625, p05=0.5625, min=0.40625),
            entropy=_ENTROPY,
            class_counts=classes,
            paths=paths,
            escalations=EscalationCounts(
                sent=counts.escalated, answered=counts.answered, timed_out=counts.timed_out, agreed=counts.answered // 2
            ),
            samples=SampleCounts(sent=counts.samples),
            outbox=OutboxStats(depth=len(self.pending), delivery="confirmed"),
            features=FeatureStats(n=counts.count, dims=FEATURES, mean=[], std=[]),
        )
        return wire.telemetry_frame(window, mean, std)

    def ack(self, now: float, cmd_id: str, state: str, rollout_id: str | None, track: bool) -> bytes:
        message = CommandAck(
            msg_id=new_msg_id(ns(now)),
            fleet_id=self.fleet,
            device_id=self.name,
            ts=now,
            seq=self.next_seq(now, track),
            cmd_id=cmd_id,
            state=state,  # type: ignore[arg-type]
            model=self.model,
            rollout_id=rollout_id,
        )
        return encode_compact(message)


class WindowCounts:
    """One device's counts for the window it closes (read from `Population`)."""

    __slots__ = ("answered", "classes", "count", "escalated", "paths", "samples", "start", "timed_out")

    def __init__(
        self,
        start: float,
        classes: list[int],
        paths: list[int],
        escalations: list[int],
        samples: int,
    ) -> None:
        self.start, self.classes, self.paths = start, classes, paths
        escalated, answered, timed_out = escalations
        self.count = sum(classes)
        self.escalated, self.answered, self.timed_out, self.samples = escalated, answered, timed_out, samples


class Population:
    """What the devices of one process look like (arrays indexed by `Device.index`) and count."""

    def __init__(self, count: int, profile: Profile, rng: np.random.Generator, start: float) -> None:
        self.mix: npt.NDArray[np.float64] = rng.dirichlet(np.full(CLASSES, 40.0), size=count)
        self.cum: npt.NDArray[np.float64] = np.cumsum(self.mix, axis=1)
        self.mean: npt.NDArray[np.float64] = rng.uniform(0, 16, (count, FEATURES))
        self.std: npt.NDArray[np.float64] = rng.uniform(1, 6, (count, FEATURES))
        self.shift: npt.NDArray[np.float64] = np.zeros((count, FEATURES))
        self.drifts = np.arange(count) < round(count * profile.drift_share)
        # The current window: class counts, answers by path (edge, cloud, edge_fallback), escalations
        # sent / answered / timed out, samples sent.
        self.classes = np.zeros((count, CLASSES), np.int64)
        self.paths = np.zeros((count, 3), np.int64)
        self.escalations = np.zeros((count, 3), np.int64)
        self.samples = np.zeros(count, np.int64)
        self.inferences = np.zeros(count, np.int64)
        # Windows (and result/2 messages) start at random phases, as devices that did not all boot
        # in the same second: else the whole fleet would send its telemetry in one burst.
        self.window_start = start - rng.uniform(0, profile.telemetry_s, count)
        self.results_phase = rng.uniform(0, profile.results_delay_s, count)

    def start_drift(self, rows: npt.NDArray[np.intp]) -> None:
        """Most of these devices' class mix onto one class, their features three spreads away."""
        target = np.eye(CLASSES)[rows % CLASSES]
        self.cum[rows] = np.cumsum(0.4 * self.mix[rows] + 0.6 * target, axis=1)
        self.shift[rows] = 3.0 * self.std[rows]

    def inputs(self, rows: npt.NDArray[np.intp], rng: np.random.Generator) -> list[bytes]:
        """One input per row, drawn from the device's feature profile, as float32 bytes."""
        x = rng.normal(self.mean[rows] + self.shift[rows], self.std[rows])
        return [row.tobytes() for row in np.clip(x, 0, 16).astype("<f4")]

    def close_windows(
        self, rows: npt.NDArray[np.intp], now: float, rng: np.random.Generator
    ) -> list[tuple[WindowCounts, bytes, bytes]]:
        """The counts and the features' float32 mean and std bytes of these devices' windows, which
        restart from zero at `now`."""
        starts, classes, paths = (
            self.window_start[rows].tolist(),
            self.classes[rows].tolist(),
            self.paths[rows].tolist(),
        )
        escalations, samples = self.escalations[rows].tolist(), self.samples[rows].tolist()
        n = np.maximum(self.classes[rows].sum(axis=1), 1)[:, None]
        std = self.std[rows]
        mean = self.mean[rows] + self.shift[rows] + rng.normal(0, 0.05, std.shape) * std / np.sqrt(n)
        spread = std * (1.0 + 0.01 * rng.standard_normal(std.shape))
        means, stds = mean.astype("<f4"), spread.astype("<f4")
        for table in (self.classes, self.paths, self.escalations, self.samples):
            table[rows] = 0
        self.window_start[rows] = now
        return [
            (WindowCounts(t, c, p, e, s), m.tobytes(), d.tobytes())
            for t, c, p, e, s, m, d in zip(starts, classes, paths, escalations, samples, means, stds, strict=True)
        ]
