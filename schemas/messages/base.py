"""The parts every message is built from: constrained scalars, the envelope, model refs, tensors."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

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


# A device's outbox numbers every message the cloud confirms (confirm/1), in put order; with the
# outbox's epoch (status/1 `outbox_epoch`) it names one stored message of one device.
Seq = Annotated[int, Meta(ge=1, le=(1 << 63) - 1)]
Epoch = Annotated[str, Meta(pattern=r"^[0-9a-f]{1,32}$", description="an outbox file's identity, lowercase hex")]


class Envelope(Struct, kw_only=True, omit_defaults=True, tag_field="schema"):
    """Fields every message carries (`seq` only those a device wants confirmed, see confirm/1)."""

    msg_id: MsgId
    fleet_id: Id
    device_id: Id
    ts: Ts
    seq: Seq | None = None
