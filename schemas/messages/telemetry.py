"""What a device reports about itself: its online status (birth/last will) and aggregated telemetry
windows."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct, field

from schemas.messages.base import (
    Count,
    Counts,
    Encodings,
    Envelope,
    Epoch,
    ModelRef,
    Name,
    NonNeg,
    Prob,
    Ts,
)


# ---- status ----------------------------------------------------------------------------------
class Status(Envelope, kw_only=True, tag="status/1"):
    """Retained on .../status: "online" as birth on every connect, "offline" as last will or at shutdown."""

    state: Literal["online", "offline"]
    reason: Literal["connected", "shutdown", "connection_lost"]
    model: ModelRef | None = None
    providers: Annotated[list[Name], Meta(max_length=16)] = field(default_factory=list)
    software: Annotated[str, Meta(max_length=64)] = ""
    started_at: Ts | None = None
    protocol: Literal["mqtt5", "mqtt311"] | None = None
    # The device's connection this status belongs to: it grows with every CONNECT, across restarts.
    # A birth and the last will of one connection carry the same number. Consumers order status
    # messages by (connection, offline after online), not by arrival: several bridges deduplicating
    # one stream can commit them in any order, and a will's `ts` is when it was prepared, at CONNECT.
    connection: Count | None = None
    # The identity of the device's outbox file: confirmations (confirm/1) name it, so a device whose
    # outbox was replaced ignores confirmations meant for the old one.
    outbox_epoch: Epoch | None = None
    # The encodings this device reads besides JSON: the cloud answers it in one of them.
    accepts: Encodings = field(default_factory=list)

    @property
    def order(self) -> int | None:
        """Where this status stands among the device's: later connections after earlier ones, and
        within one connection "offline" after "online" (None from devices that send no connection)."""
        return None if self.connection is None else 2 * self.connection + (self.state == "offline")


# ---- telemetry -------------------------------------------------------------------------------
class LatencyStats(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Inference latency in milliseconds over the window (input accepted -> result final at the edge)."""

    p50: NonNeg
    p95: NonNeg
    p99: NonNeg
    max: NonNeg
    mean: NonNeg


class ConfidenceStats(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Top-1 probability over the window; `p05` is the 5% quantile (the unsure tail)."""

    mean: Prob
    p05: Prob
    min: Prob


class EntropyStats(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Shannon entropy of the class distribution, in nats."""

    mean: NonNeg
    p95: NonNeg
    max: NonNeg


class EscalationCounts(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Escalations to the cloud model in the window, by outcome."""

    sent: Count = 0
    answered: Count = 0
    timed_out: Count = 0
    offline_fallback: Count = 0
    shed: Annotated[int, Meta(ge=0, description="not sent: too many outstanding")] = 0
    errors: Count = 0
    agreed: Annotated[int, Meta(ge=0, description="answered with the edge's label")] = 0
    over_budget: Annotated[int, Meta(ge=0, description="not sent: over max_escalations_per_minute")] = 0
    paused: Annotated[int, Meta(ge=0, description="not sent: the cloud said it does not help here (pause_s)")] = 0


class SampleCounts(Struct, frozen=True, kw_only=True, omit_defaults=True):
    sent: Count = 0
    skipped_budget: Annotated[int, Meta(ge=0, description="uncertain but over max_per_minute")] = 0


class OutboxStats(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The durable uplink buffer: depth and bytes now, drops in the window by priority class."""

    depth: Count = 0
    bytes: Count = 0
    evicted: Counts = field(default_factory=dict)
    expired: Counts = field(default_factory=dict)
    available: bool = True
    write_errors: Annotated[
        int, Meta(ge=0, description="writes the outbox refused (disk full, read-only, I/O): their messages are lost")
    ] = 0
    delivery: Annotated[
        Literal["confirmed", "broker"] | None,
        Meta(description="confirmed: a row leaves when the cloud confirmed it; broker: on the broker's PUBACK"),
    ] = None
    unconfirmed: Annotated[int, Meta(ge=0, description="rows the broker acknowledged, awaiting confirmation")] = 0
    resent: Annotated[int, Meta(ge=0, description="rows sent again in the window: unconfirmed past the timeout")] = 0
    confirmed: Annotated[int, Meta(ge=0, description="rows confirmed by the cloud in the window")] = 0


class Resources(Struct, frozen=True, kw_only=True, omit_defaults=True):
    cpu_percent: NonNeg
    rss_mb: NonNeg


class Providers(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """ONNX Runtime execution providers: requested in config vs really active in the session."""

    requested: Annotated[list[Name], Meta(max_length=16)]
    active: Annotated[list[Name], Meta(max_length=16)]
    fallback: bool


class FeatureStats(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Per-feature mean/std of the inputs in the window (pooled to at most 256 features) for drift."""

    n: Count
    dims: Annotated[int, Meta(ge=0, description="features in the raw input before pooling")]
    mean: Annotated[list[float], Meta(max_length=256)]
    std: Annotated[list[float], Meta(max_length=256)]


class LinkBytes(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What the link cost in the window, as MQTT encodes it, per channel (results, telemetry,
    escalate, escalate/reply, protocol, ...), and what the daily byte budget held back."""

    up: Annotated[Counts, Meta(description="bytes sent, by channel (our PUBACKs booked to the channel they ack)")] = (
        field(default_factory=dict)
    )
    down: Annotated[Counts, Meta(description="bytes received, by channel (PUBACKs to the channel they ack)")] = field(
        default_factory=dict
    )
    held: Annotated[
        Counts,
        Meta(description="held back by [uplink] daily_bytes: answers (results), samples, escalations, windows"),
    ] = field(default_factory=dict)
    budget_left: Annotated[int, Meta(ge=0, description="bytes the daily budget can spend now")] | None = None


class ShadowStats(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A candidate model run in shadow beside the active one (a rollout's shadow stage) over the window:
    on a sampled share of the inputs, its answers never used. Each agreement pair counts the same inputs."""

    model: ModelRef
    inputs: Annotated[int, Meta(ge=0, description="inputs the shadow model ran")] = 0
    skipped: Annotated[int, Meta(ge=0, description="sampled inputs dropped: the shadow runner was busy")] = 0
    errors: Annotated[int, Meta(ge=0, description="inputs whose shadow run raised")] = 0
    agreed: Annotated[int, Meta(ge=0, description="shadow top-1 equal to the active model's")] = 0
    labeled: Annotated[int, Meta(ge=0, description="inputs with a known label (truth)")] = 0
    correct: Annotated[int, Meta(ge=0, description="labeled inputs the shadow answered right")] = 0
    active_correct: Annotated[
        int, Meta(ge=0, description="the same labeled inputs the active model answered right")
    ] = 0
    cloud_answered: Annotated[int, Meta(ge=0, description="shadowed inputs whose escalation the cloud answered")] = 0
    cloud_agreed: Annotated[int, Meta(ge=0, description="of those, the shadow's label equal to the cloud's")] = 0
    active_cloud_agreed: Annotated[int, Meta(ge=0, description="of those, the active's label equal to the cloud's")] = 0
    confidence_mean: Prob | None = None
    latency_p95_ms: Annotated[NonNeg | None, Meta(description="the shadow's run per input, its own thread")] = None


class Telemetry(Envelope, kw_only=True, tag="telemetry/1"):
    """One aggregated window, published every interval_s. `ts` equals `window_end`."""

    model: ModelRef
    window_start: Ts
    window_end: Ts
    window_seq: Annotated[int, Meta(ge=0, description="windows since the node started")]
    count: Annotated[int, Meta(ge=0, description="inferences finished in the window")]
    rejected: Annotated[int, Meta(ge=0, description="inputs refused (bad shape/dtype/NaN/undecodable)")] = 0
    rejected_reasons: Counts = field(default_factory=dict)
    latency_ms: Annotated[
        LatencyStats | None, Meta(description="every final answer, accepted -> final (cloud round trips included)")
    ] = None
    edge_latency_ms: Annotated[
        LatencyStats | None,
        Meta(description="answers final at the edge only: the device's own speed, without cloud round trips"),
    ] = None
    confidence: ConfidenceStats | None = None
    entropy: EntropyStats | None = None
    class_counts: Counts = field(default_factory=dict)
    paths: Annotated[Counts, Meta(description="final answers by path: edge, cloud, edge_fallback")] = field(
        default_factory=dict
    )
    escalations: EscalationCounts = field(default_factory=EscalationCounts)
    samples: SampleCounts = field(default_factory=SampleCounts)
    outbox: OutboxStats = field(default_factory=OutboxStats)
    resources: Resources | None = None
    providers: Providers | None = None
    features: FeatureStats | None = None
    clock_offset_s: Annotated[
        float | None, Meta(description="this device's clock minus the cloud's, estimated from clock/1 round trips")
    ] = None
    link: LinkBytes | None = None
    shadow: ShadowStats | None = None


# ---- inference traffic -------------------------------------------------------------------------
