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

import msgspec

from schemas.messages.alerts import Alert
from schemas.messages.base import DType, Envelope, Epoch, ModelRef, Seq, Tensor, TopK
from schemas.messages.control import ClockReply, ClockRequest, Confirm
from schemas.messages.inference import (
    MAX_ANSWERS,
    Answer,
    EscalationReply,
    EscalationRequest,
    FallbackReason,
    Input,
    Path,
    Result,
    Results,
    Sample,
    SampleReason,
)
from schemas.messages.ota import AckState, Command, CommandAck, ModelChunk, ModelChunkRequest, ModelDelta, ModelUpdate
from schemas.messages.telemetry import (
    ConfidenceStats,
    EntropyStats,
    EscalationCounts,
    FeatureStats,
    LatencyStats,
    LinkBytes,
    OutboxStats,
    Providers,
    Resources,
    SampleCounts,
    ShadowStats,
    Status,
    Telemetry,
)

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
    | Confirm
    | ClockRequest
    | ClockReply
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
    Confirm,
    ClockRequest,
    ClockReply,
)


@functools.cache
def schema_name(message_type: type[Envelope]) -> str:
    """The `schema` tag of a message type, e.g. "telemetry/1" (cached: introspection costs ~300 us)."""
    tag = msgspec.inspect.type_info(message_type).tag  # type: ignore[attr-defined]
    assert isinstance(tag, str)
    return tag


__all__ = [
    "ALL_MESSAGES",
    "MAX_ANSWERS",
    "AckState",
    "Alert",
    "Answer",
    "ClockReply",
    "ClockRequest",
    "Command",
    "CommandAck",
    "ConfidenceStats",
    "Confirm",
    "DType",
    "EntropyStats",
    "Envelope",
    "Epoch",
    "EscalationCounts",
    "EscalationReply",
    "EscalationRequest",
    "FallbackReason",
    "FeatureStats",
    "Input",
    "LatencyStats",
    "LinkBytes",
    "Message",
    "ModelChunk",
    "ModelChunkRequest",
    "ModelDelta",
    "ModelRef",
    "ModelUpdate",
    "OutboxStats",
    "Path",
    "Providers",
    "Resources",
    "Result",
    "Results",
    "Sample",
    "SampleCounts",
    "SampleReason",
    "Seq",
    "ShadowStats",
    "Status",
    "Telemetry",
    "Tensor",
    "TopK",
    "schema_name",
]
