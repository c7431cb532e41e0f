"""Every message on the wire, as typed structs.

Each message is a JSON object whose `schema` field names its type and major version
("telemetry/1"). A reader accepts exactly the versions it knows; an incompatible change bumps
the version and both sides learn it. Unknown extra fields are ignored (additive changes stay
compatible). All times are unix seconds (float, UTC). All counts in telemetry are per window
unless the field says otherwise. JSON Schema files generated from these types live in
schemas/json/ (`python -m schemas.export` rewrites them; a test keeps them in step).
"""

from __future__ import annotations

import functools
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct, field

from schemas.msgid import MSG_ID_PATTERN
from schemas.topics import ID_PATTERN

# ---- constrained scalars -------------------------------------------------------------------
Id = Annotated[str, Meta(pattern=ID_PATTERN, max_length=64, description="fleet or device id")]
MsgId = Annotated[str, Meta(pattern=MSG_ID_PATTERN, description="UUIDv7: unique and time-ordered")]
RefId = Annotated[str, Meta(min_length=1, max_length=128)]
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Label = Annotated[str, Meta(min_length=1, max_length=64)]
Sha256 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$", description="lowercase hex sha256")]
Ts = Annotated[float, Meta(ge=0, description="unix time in seconds, UTC")]
Count = Annotated[int, Meta(ge=0)]
Prob = Annotated[float, Meta(ge=0.0, le=1.0)]
NonNeg = Annotated[float, Meta(ge=0.0)]
Text = Annotated[str, Meta(max_length=1024)]
Base64 = Annotated[str, Meta(max_length=16 * 1024 * 1024, description="standard base64, padded")]
Counts = Annotated[dict[Label, Count], Meta(max_length=1024)]
Floats = Annotated[list[float], Meta(max_length=1024)]
DType = Literal["float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"]


class ModelRef(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Which model produced something: name, version and the sha256 of the .onnx file."""

    name: Name
    version: Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")]
    sha256: Sha256


class Tensor(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An n-d array: raw little-endian bytes of `dtype`, C order, base64 encoded."""

    dtype: DType
    shape: Annotated[list[Annotated[int, Meta(ge=0, le=1 << 24)]], Meta(max_length=8)]
    data: Base64


class TopK(Struct, frozen=True, kw_only=True, omit_defaults=True):
    label: Label
    index: Count
    prob: Prob


class Envelope(Struct, kw_only=True, omit_defaults=True, tag_field="schema"):
    """Fields every message carries."""

    msg_id: MsgId
    fleet_id: Id
    device_id: Id
    ts: Ts


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


# ---- inference traffic -------------------------------------------------------------------------
SampleReason = Literal["entropy", "margin"]
Path = Literal["edge", "cloud", "edge_fallback"]
FallbackReason = Literal["timeout", "offline", "shed", "error"]


class Sample(Envelope, kw_only=True, tag="sample/1"):
    """An uncertain input sent up for labeling, with what the edge model thought of it."""

    model: ModelRef
    inference_id: RefId
    input: Tensor
    predicted: Label
    topk: Annotated[list[TopK], Meta(min_length=1, max_length=32)]
    entropy: NonNeg
    margin: Annotated[float, Meta(ge=0.0, le=1.0, description="top-1 minus top-2 probability")]
    reasons: Annotated[list[SampleReason], Meta(min_length=1, max_length=2)]
    source_ref: Annotated[str, Meta(max_length=256)] | None = None
    truth: Label | None = None


class Input(Envelope, kw_only=True, tag="input/1"):
    """An input tensor for the device's model (the `mqtt` input source)."""

    input_id: RefId
    tensor: Tensor
    truth: Label | None = None


class EscalationRequest(Envelope, kw_only=True, tag="escalate/1"):
    """An unsure input the device asks the cloud model about. Reply on `reply_to` with `request_id`."""

    request_id: RefId
    model: ModelRef
    input: Tensor
    edge_topk: Annotated[list[TopK], Meta(min_length=1, max_length=32)]
    deadline: Annotated[float, Meta(ge=0, description="unix time after which the device no longer waits")]
    reply_to: Annotated[str, Meta(min_length=1, max_length=512)]


class EscalationReply(Envelope, kw_only=True, tag="escalate_reply/1"):
    """The cloud model's answer; `device_id` is the asking device."""

    request_id: RefId
    model: ModelRef | None = None
    label: Label | None = None
    index: Count | None = None
    confidence: Prob | None = None
    topk: Annotated[list[TopK], Meta(max_length=32)] = field(default_factory=list)
    latency_ms: NonNeg = 0.0
    error: Text | None = None


class Result(Envelope, kw_only=True, tag="result/1"):
    """The final answer for one input and which path gave it.

    Superseded by `Results` (result/2), which carries a whole micro-batch in one message; readers
    still accept result/1 from devices that run older software."""

    inference_id: RefId
    model: ModelRef
    label: Label
    index: Count
    confidence: Prob
    path: Path
    fallback_reason: FallbackReason | None = None
    edge_label: Label
    cloud_label: Label | None = None
    latency_ms: NonNeg
    source_ref: Annotated[str, Meta(max_length=256)] | None = None
    truth: Label | None = None


class Answer(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One input's final answer inside a `Results` message."""

    inference_id: RefId
    label: Label
    index: Count
    confidence: Prob
    path: Path
    fallback_reason: FallbackReason | None = None
    edge_label: Label
    cloud_label: Label | None = None
    latency_ms: NonNeg
    source_ref: Annotated[str, Meta(max_length=256)] | None = None
    truth: Label | None = None


MAX_ANSWERS = 1024


class Results(Envelope, kw_only=True, tag="result/2"):
    """The final answers of inputs that one model finished together (a micro-batch, or one escalated
    input when the cloud's reply arrives); each answer names its input by `inference_id`.

    One message per batch instead of one per input: the device pays one outbox row and one MQTT
    publish for a batch, and the uplink carries the envelope once. `ts` is when the answers became
    final; each answer's `latency_ms` counts from when its input was accepted."""

    model: ModelRef
    answers: Annotated[list[Answer], Meta(min_length=1, max_length=MAX_ANSWERS)]


# ---- commands ----------------------------------------------------------------------------------
class ModelDelta(Struct, frozen=True, kw_only=True):
    """A binary patch (bsdiff4) from a model the device already has to the update's model, offered
    when it is much smaller than the model. Fetched like a model (chunks of `chunk_size` on
    `chunk_topic`, requested by this `sha256`); the patched file must hash to the update's
    model.sha256, so a bad patch is caught like a bad download (the device then fetches the model)."""

    base_sha256: Sha256
    sha256: Sha256
    size: Annotated[int, Meta(ge=1, le=1 << 31)]
    chunks: Annotated[int, Meta(ge=1)]
    chunk_topic: Annotated[str, Meta(min_length=1, max_length=512)]


class ModelUpdate(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What to install and how to fetch it (chunks over MQTT, so it works through a gateway)."""

    model: ModelRef
    size: Annotated[int, Meta(ge=1, le=1 << 31)]
    chunk_size: Annotated[int, Meta(ge=1024, le=1 << 20)]
    chunks: Annotated[int, Meta(ge=1)]
    chunk_topic: Annotated[str, Meta(min_length=1, max_length=512)]
    delta: ModelDelta | None = None
    health_tolerance: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.05
    latency_budget_ms: NonNeg = 50.0


class Command(Envelope, kw_only=True, tag="cmd/1"):
    """A cloud -> device command, Ed25519-signed over its canonical encoding (all fields but `signature`)."""

    cmd_id: MsgId
    action: Literal["model_update", "rollback", "ping"]
    issued_at: Ts
    expires_at: Ts
    key_id: Annotated[str, Meta(min_length=1, max_length=64)]
    signature: Annotated[str, Meta(max_length=256, description="base64 Ed25519 signature")] = ""
    update: ModelUpdate | None = None
    rollout_id: RefId | None = None
    stage: Annotated[int, Meta(ge=0)] | None = None


AckState = Literal[
    "received",
    "rejected",
    "downloading",
    "verifying",
    "installing",
    "installed",
    "health_failed",
    "rolled_back",
    "failed",
    "done",
]


class CommandAck(Envelope, kw_only=True, tag="cmd_ack/1"):
    """Progress and outcome of a command, on .../cmd/ack."""

    cmd_id: MsgId
    state: AckState
    reason: Text | None = None
    progress: Prob | None = None
    model: ModelRef | None = None
    active_slot: Literal["A", "B"] | None = None
    rollout_id: RefId | None = None


# ---- model delivery ----------------------------------------------------------------------------
ChunkIndex = Annotated[int, Meta(ge=0, le=1 << 20)]


class ModelChunkRequest(Envelope, kw_only=True, tag="model_request/1"):
    """A device asks for the chunks of a model it still lacks (all of them at first, the missing ones
    after a cut). On .../model/request; the chunks come back on {prefix}/{fleet}/models/{sha256}."""

    cmd_id: MsgId
    sha256: Sha256
    chunks: Annotated[list[ChunkIndex], Meta(min_length=1, max_length=4096)]


class ModelChunk(Envelope, kw_only=True, tag="model_chunk/1"):
    """One chunk of a model artifact; `device_id` is the device whose request it answers, but any
    device downloading the same `sha256` may keep it. `data` must hash to `chunk_sha256`."""

    sha256: Sha256
    index: ChunkIndex
    chunks: Annotated[int, Meta(ge=1, le=1 << 20)]
    chunk_sha256: Sha256
    data: Annotated[str, Meta(max_length=2 * 1024 * 1024, description="standard base64, padded")]


# ---- alerts ------------------------------------------------------------------------------------
class Alert(Envelope, kw_only=True, tag="alert/1"):
    """A drift or latency alert about one device and model version, on {prefix}/{fleet}/alerts."""

    alert_id: RefId
    kind: Literal["prediction_drift", "confidence_drift", "feature_drift", "latency"]
    state: Literal["firing", "resolved"]
    model: ModelRef
    score: float
    threshold: float
    window_start: Ts
    window_end: Ts
    detail: Text = ""


Message = (
    Status
    | Telemetry
    | Sample
    | Input
    | EscalationRequest
    | EscalationReply
    | Result
    | Results
    | Command
    | CommandAck
    | ModelChunkRequest
    | ModelChunk
    | Alert
)
ALL_MESSAGES: tuple[type[Envelope], ...] = (
    Status,
    Telemetry,
    Sample,
    Input,
    EscalationRequest,
    EscalationReply,
    Result,
    Results,
    Command,
    CommandAck,
    ModelChunkRequest,
    ModelChunk,
    Alert,
)


@functools.cache
def schema_name(message_type: type[Envelope]) -> str:
    """The `schema` tag of a message type, e.g. "telemetry/1" (cached: introspection costs ~300 us)."""
    tag = msgspec.inspect.type_info(message_type).tag  # type: ignore[attr-defined]
    assert isinstance(tag, str)
    return tag
