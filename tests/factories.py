"""Valid example messages of every type, for contract and integration tests."""

from __future__ import annotations

import hashlib
import time
from typing import TypedDict

import numpy as np

from schemas import (
    Alert,
    Answer,
    ClockReply,
    ClockRequest,
    Command,
    CommandAck,
    ConfidenceStats,
    Confirm,
    EntropyStats,
    Envelope,
    EscalationCounts,
    EscalationReply,
    EscalationRequest,
    FeatureStats,
    Input,
    LatencyStats,
    ModelChunk,
    ModelChunkRequest,
    ModelRef,
    ModelUpdate,
    OutboxStats,
    Providers,
    Resources,
    Result,
    Results,
    Sample,
    SampleCounts,
    Status,
    Telemetry,
    TopK,
    encode_tensor,
    new_msg_id,
)
from schemas.topics import Channel, Topics

MODEL = ModelRef(name="digits-edge", version="1.0.0", sha256="ab" * 32)
CLOUD = ModelRef(name="digits-cloud", version="1.0.0", sha256="cd" * 32)


class EnvelopeFields(TypedDict):
    """The fields every message carries (typed, so `Status(**envelope(), ...)` type-checks)."""

    msg_id: str
    fleet_id: str
    device_id: str
    ts: float


def envelope(fleet_id: str = "f1", device_id: str = "dev-1") -> EnvelopeFields:
    return {"msg_id": new_msg_id(), "fleet_id": fleet_id, "device_id": device_id, "ts": time.time()}


def examples(fleet_id: str = "f1", device_id: str = "dev-1") -> list[Envelope]:
    """One fully populated message of each type."""
    now = time.time()
    x = encode_tensor(np.arange(64, dtype=np.float32).reshape(1, 64) % 17)
    topk = [TopK(label="3", index=3, prob=0.55), TopK(label="8", index=8, prob=0.40)]

    def env() -> EnvelopeFields:
        return envelope(fleet_id, device_id)

    cmd_id = new_msg_id()
    return [
        Status(
            **env(),
            state="online",
            reason="connected",
            model=MODEL,
            providers=["CPUExecutionProvider"],
            software="0.1.0",
            started_at=now - 5,
            protocol="mqtt5",
            connection=1_764_000_000_000,
            outbox_epoch="3f9a0c12d4e5b678",
            seq=3,
        ),
        Telemetry(
            **env(),
            model=MODEL,
            window_start=now - 10,
            window_end=now,
            window_seq=7,
            count=100,
            rejected=2,
            rejected_reasons={"shape": 1, "nonfinite": 1},
            latency_ms=LatencyStats(p50=0.1, p95=0.3, p99=0.5, max=1.2, mean=0.15),
            edge_latency_ms=LatencyStats(p50=0.09, p95=0.2, p99=0.25, max=0.3, mean=0.1),
            confidence=ConfidenceStats(mean=0.93, p05=0.61, min=0.31),
            entropy=EntropyStats(mean=0.2, p95=0.9, max=1.4),
            class_counts={"3": 40, "8": 60},
            paths={"edge": 90, "cloud": 8, "edge_fallback": 2},
            escalations=EscalationCounts(sent=10, answered=8, timed_out=2, agreed=6),
            samples=SampleCounts(sent=3, skipped_budget=1),
            outbox=OutboxStats(
                depth=5, bytes=1000, evicted={"samples": 1}, delivery="confirmed", unconfirmed=4, resent=1, confirmed=90
            ),
            clock_offset_s=-0.012,
            resources=Resources(cpu_percent=12.5, rss_mb=70.1),
            providers=Providers(requested=["CPUExecutionProvider"], active=["CPUExecutionProvider"], fallback=False),
            features=FeatureStats(n=100, dims=64, mean=[0.5] * 64, std=[0.1] * 64),
        ),
        Sample(
            **env(),
            model=MODEL,
            inference_id="inf-1",
            input=x,
            predicted="3",
            topk=topk,
            entropy=0.8,
            margin=0.15,
            reasons=["margin"],
            source_ref="replay:12",
            truth="8",
        ),
        Input(**env(), input_id="in-1", tensor=x, truth="3"),
        EscalationRequest(
            **env(),
            request_id="inf-1",
            model=MODEL,
            input=x,
            edge_topk=topk,
            deadline=now + 2,
            reply_to=f"fleet/{fleet_id}/{device_id}/escalate/reply",
        ),
        EscalationReply(
            **env(),
            request_id="inf-1",
            model=CLOUD,
            label="8",
            index=8,
            confidence=0.97,
            topk=[TopK(label="8", index=8, prob=0.97)],
            latency_ms=3.2,
        ),
        Result(
            **env(),
            inference_id="inf-1",
            model=MODEL,
            label="8",
            index=8,
            confidence=0.97,
            path="cloud",
            edge_label="3",
            cloud_label="8",
            latency_ms=12.0,
            source_ref="replay:12",
            truth="8",
        ),
        Results(
            **env(),
            model=MODEL,
            answers=[
                Answer(
                    inference_id="inf-2",
                    label="3",
                    index=3,
                    confidence=0.91,
                    path="edge",
                    edge_label="3",
                    latency_ms=0.4,
                    source_ref="replay:13",
                    truth="3",
                ),
                Answer(
                    inference_id="inf-1",
                    label="8",
                    index=8,
                    confidence=0.97,
                    path="cloud",
                    edge_label="3",
                    cloud_label="8",
                    latency_ms=12.0,
                    source_ref="replay:12",
                    truth="8",
                ),
            ],
        ),
        Command(
            **env(),
            cmd_id=cmd_id,
            action="model_update",
            issued_at=now,
            expires_at=now + 3600,
            key_id="k1",
            signature="c2ln",
            rollout_id="r1",
            stage=1,
            update=ModelUpdate(
                model=CLOUD, size=20000, chunk_size=65536, chunks=1, chunk_topic="fleet/f1/models/" + "cd" * 32
            ),
        ),
        CommandAck(**env(), cmd_id=cmd_id, state="downloading", progress=0.5, model=CLOUD, active_slot="A"),
        ModelChunkRequest(**env(), cmd_id=cmd_id, sha256="cd" * 32, chunks=[0, 2, 3]),
        ModelChunk(
            **env(), sha256="cd" * 32, index=2, chunks=4, chunk_sha256=hashlib.sha256(b"abc").hexdigest(), data="YWJj"
        ),
        Alert(
            **env(),
            alert_id="a1",
            kind="prediction_drift",
            state="firing",
            model=MODEL,
            score=0.4,
            threshold=0.25,
            window_start=now - 60,
            window_end=now,
            detail="PSI 0.40 over 6 windows",
        ),
        Confirm(**env(), epoch="3f9a0c12d4e5b678", ranges=[[1, 40], [43, 43]]),
        ClockRequest(**env()),
        ClockReply(**env(), request_id=cmd_id, request_ts=now - 0.2, received=now - 0.1),
    ]


# The channel each message a device sends arrives on at the bridge (result/1 comes from devices on
# older software); alerts have their own topic.
CHANNEL_OF: dict[type[Envelope], Channel] = {
    Status: Channel.STATUS,
    Telemetry: Channel.TELEMETRY,
    Sample: Channel.SAMPLES,
    Result: Channel.RESULTS,
    Results: Channel.RESULTS,
    CommandAck: Channel.CMD_ACK,
}


def topic_for(message: Envelope) -> str:
    """The topic an example is published on, as a device (or the drift detector, for an alert) would."""
    topics = Topics()
    if isinstance(message, Alert):
        return topics.alerts(message.fleet_id)
    return topics.device(message.fleet_id, message.device_id, CHANNEL_OF[type(message)])
