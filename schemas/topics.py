"""The topic layout: the only place that builds or parses an MQTT topic.

    {prefix}/{fleet_id}/{device_id}/status          retained birth ("online") and last will ("offline")
    {prefix}/{fleet_id}/{device_id}/telemetry       aggregated window every interval_s
    {prefix}/{fleet_id}/{device_id}/samples         uncertain samples for labelers
    {prefix}/{fleet_id}/{device_id}/samples/json    the archived samples as JSON, cloud -> labelers
    {prefix}/{fleet_id}/{device_id}/results         per-inference results for local consumers
    {prefix}/{fleet_id}/{device_id}/input           input tensors (an input source)
    {prefix}/{fleet_id}/{device_id}/escalate        escalation request, device -> cloud
    {prefix}/{fleet_id}/{device_id}/escalate/reply  escalation reply, cloud -> device
    {prefix}/{fleet_id}/{device_id}/cmd             commands, cloud -> device (QoS 1, persistent session)
    {prefix}/{fleet_id}/{device_id}/cmd/ack         command progress and outcome, device -> cloud
    {prefix}/{fleet_id}/{device_id}/model/request   which chunks of a model a device still needs
    {prefix}/{fleet_id}/{device_id}/confirm         what the cloud stored, cloud -> device (QoS 1)
    {prefix}/{fleet_id}/{device_id}/clock           clock request, device -> cloud
    {prefix}/{fleet_id}/{device_id}/clock/reply     clock reply, cloud -> device
    {prefix}/{fleet_id}/alerts                      drift and latency alerts, cloud -> anyone
    {prefix}/{fleet_id}/models/{sha256}             chunks of one model artifact, cloud -> devices

Model chunks travel on a per-model topic so that every device downloading the same artifact
(through the same gateway) can use every chunk; a device subscribes to it only while it downloads.
"models" is therefore reserved and cannot be a device id.

The escalation reply topic is the same under MQTT 5 and 3.1.1: over MQTT 5 the request also
carries it as Response Topic with the request id as Correlation Data; over 3.1.1 (a gateway that
does not speak 5) the device subscribes to it and matches the `request_id` inside the payload.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from schemas.errors import TopicError

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
_ID_RE = re.compile(ID_PATTERN)
_FORBIDDEN = {"/": "'/'", "+": "'+'", "#": "'#'", "\x00": "NUL"}


class Channel(enum.StrEnum):
    """The per-device topic suffixes."""

    STATUS = "status"
    TELEMETRY = "telemetry"
    SAMPLES = "samples"
    SAMPLES_JSON = "samples/json"
    RESULTS = "results"
    INPUT = "input"
    ESCALATE = "escalate"
    ESCALATE_REPLY = "escalate/reply"
    CMD = "cmd"
    CMD_ACK = "cmd/ack"
    MODEL_REQUEST = "model/request"
    CONFIRM = "confirm"
    CLOCK = "clock"
    CLOCK_REPLY = "clock/reply"


ALERTS = "alerts"
MODELS = "models"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHANNELS = {c.value: c for c in Channel}


def validate_id(kind: str, value: str) -> str:
    """Return `value` if it is a valid fleet or device id, else raise TopicError naming the problem."""
    if isinstance(value, str) and _ID_RE.match(value):
        return value  # the pattern admits none of _FORBIDDEN: the checks below only name the problem
    if not isinstance(value, str) or not value:
        raise TopicError(f"{kind} must be a non-empty string, got {value!r}")
    for char, name in _FORBIDDEN.items():
        if char in value:
            raise TopicError(f"{kind} {value!r} contains {name}, which MQTT topics reserve")
    if not _ID_RE.match(value):
        raise TopicError(
            f"{kind} {value!r} is not allowed: use 1-64 characters from A-Z a-z 0-9 . _ : - "
            "starting with a letter or digit"
        )
    return value


def _validate_device(device_id: str) -> str:
    validate_id("device_id", device_id)
    if device_id == MODELS:
        raise TopicError(f"device_id {MODELS!r} is reserved for the model chunk topics; choose another id")
    return device_id


def _validate_prefix(prefix: str) -> str:
    levels = prefix.split("/")
    if prefix.startswith("$") or any(not lv for lv in levels):
        raise TopicError(f"topic prefix {prefix!r} must be non-empty levels and not start with '$'")
    if any(c in prefix for c in "+#\x00"):
        raise TopicError(f"topic prefix {prefix!r} must not contain '+', '#' or NUL")
    return prefix


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    """A parsed per-device topic."""

    fleet_id: str
    device_id: str
    channel: Channel


@dataclass(frozen=True, slots=True)
class AlertsTopic:
    """A parsed fleet alerts topic."""

    fleet_id: str


@dataclass(frozen=True, slots=True)
class ModelTopic:
    """A parsed per-model chunk topic."""

    fleet_id: str
    sha256: str


def _validate_sha256(value: str) -> str:
    if not _SHA256_RE.match(value):
        raise TopicError(f"model sha256 {value!r} must be 64 lowercase hex characters")
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds and parses every topic of one deployment (`prefix` defaults to "fleet")."""

    prefix: str = "fleet"

    def __post_init__(self) -> None:
        _validate_prefix(self.prefix)

    def device(self, fleet_id: str, device_id: str, channel: Channel) -> str:
        validate_id("fleet_id", fleet_id)
        _validate_device(device_id)
        return f"{self.prefix}/{fleet_id}/{device_id}/{channel.value}"

    def model_chunks(self, fleet_id: str, sha256: str) -> str:
        validate_id("fleet_id", fleet_id)
        return f"{self.prefix}/{fleet_id}/{MODELS}/{_validate_sha256(sha256)}"

    def model_chunks_filter(self, fleet_id: str = "+") -> str:
        if fleet_id != "+":
            validate_id("fleet_id", fleet_id)
        return f"{self.prefix}/{fleet_id}/{MODELS}/+"

    def alerts(self, fleet_id: str) -> str:
        validate_id("fleet_id", fleet_id)
        return f"{self.prefix}/{fleet_id}/{ALERTS}"

    def filter(self, channel: Channel, fleet_id: str = "+", device_id: str = "+") -> str:
        """A subscription filter for one channel; '+' matches every fleet/device."""
        if fleet_id != "+":
            validate_id("fleet_id", fleet_id)
        if device_id != "+":
            _validate_device(device_id)
        return f"{self.prefix}/{fleet_id}/{device_id}/{channel.value}"

    def alerts_filter(self, fleet_id: str = "+") -> str:
        if fleet_id != "+":
            validate_id("fleet_id", fleet_id)
        return f"{self.prefix}/{fleet_id}/{ALERTS}"

    @staticmethod
    def shared(group: str, topic_filter: str) -> str:
        """An MQTT 5 shared subscription: brokers deal each message to one member of `group`."""
        validate_id("share group", group)
        return f"$share/{group}/{topic_filter}"

    def parse(self, topic: str) -> DeviceTopic | AlertsTopic | ModelTopic:
        """Parse a concrete topic; raise TopicError if it is not part of this layout."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise TopicError(f"topic {topic!r} is outside prefix {self.prefix!r}")
        parts = topic[len(head) :].split("/")
        if len(parts) == 2 and parts[1] == ALERTS:
            return AlertsTopic(validate_id("fleet_id", parts[0]))
        if len(parts) == 3 and parts[1] == MODELS:
            return ModelTopic(validate_id("fleet_id", parts[0]), _validate_sha256(parts[2]))
        if len(parts) < 3:
            raise TopicError(f"topic {topic!r} has no channel: expected {head}FLEET/DEVICE/CHANNEL")
        channel = _CHANNELS.get("/".join(parts[2:]))
        if channel is None:
            known = ", ".join(sorted(_CHANNELS))
            raise TopicError(f"topic {topic!r} has unknown channel {'/'.join(parts[2:])!r} (known: {known})")
        return DeviceTopic(validate_id("fleet_id", parts[0]), _validate_device(parts[1]), channel)

    def parse_device(self, topic: str) -> DeviceTopic:
        parsed = self.parse(topic)
        if not isinstance(parsed, DeviceTopic):
            raise TopicError(f"topic {topic!r} is not a device topic")
        return parsed
