"""Inputs, answers and what is in between: input tensors, escalations to the cloud model and its
replies, results, uncertain samples."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct, field

from schemas.messages.base import (
    Count,
    Envelope,
    Label,
    ModelRef,
    NonNeg,
    Prob,
    RefId,
    Tensor,
    Text,
    TopK,
)

SampleReason = Literal["entropy", "margin"]
Path = Literal["edge", "cloud", "edge_fallback"]
# "budget": the escalation budget ([routing] max_escalations_per_minute) was spent. A bridge older
# than the devices rejects it: upgrade the cloud side first, as with every contract addition.
FallbackReason = Literal["timeout", "offline", "shed", "error", "budget"]


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


# Inputs come from other programs (a camera's firmware, `mosquitto_pub`), which cannot be asked for a
# UUIDv7: any unique id of bounded length will do, since the device only deduplicates by it. Every
# message a device sends keeps the UUIDv7 of `Envelope`.
InputMsgId = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=128,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="unique per input (the device drops a repeat): 1-128 characters, no control characters",
    ),
]


class Input(Envelope, kw_only=True, tag="input/1"):
    """An input tensor for the device's model (the `mqtt` input source)."""

    msg_id: InputMsgId
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
    pause_s: (
        Annotated[
            float,
            Meta(
                ge=0,
                le=86400,
                description="the cloud model is not better than this device's model here (labeled samples say so): "
                "ask nothing for this long",
            ),
        ]
        | None
    ) = None


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
