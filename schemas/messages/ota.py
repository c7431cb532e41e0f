"""Model updates: signed commands, their acks, and model chunks requested and served."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

from schemas.messages.base import (
    Envelope,
    ModelRef,
    MsgId,
    NonNeg,
    Prob,
    RefId,
    Sha256,
    Text,
    Ts,
)


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
    # shadow_start: fetch and verify `update`'s model like a model_update, then run it beside the
    # active model on a sampled share of inputs, its answers never used (edge_node/inference/shadow.py);
    # shadow_stop: stop it. Neither touches the A/B slots.
    action: Literal["model_update", "rollback", "ping", "shadow_start", "shadow_stop"]
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
    data: Annotated[bytes, Meta(max_length=1 << 20, description="the chunk's bytes (base64 in JSON)")]


# ---- alerts ------------------------------------------------------------------------------------
