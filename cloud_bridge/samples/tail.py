"""`cloud-bridge samples tail`: print uncertain samples live as devices send them.

A separate, non-shared subscriber with its own client id and a clean session: it sees every sample
(a shared subscription would take them away from the bridges) and leaves nothing queued behind on
the broker when it exits. It reconnects with backoff until stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import aiomqtt
import paho.mqtt.client as paho

from cloud_bridge.config import BridgeConfig
from cloud_bridge.errors import ConfigError
from cloud_bridge.samples.export import iso
from common.tls import client_context
from schemas.codec import decode_for_topic
from schemas.errors import DecodeError
from schemas.messages import Sample
from schemas.topics import Channel

log = logging.getLogger(__name__)

_RECONNECT_MIN_S = 0.5
_RECONNECT_MAX_S = 10.0


@dataclass
class TailStats:
    printed: int = 0
    invalid: int = 0


@dataclass(frozen=True)
class TailOptions:
    fleet: str = "+"
    device: str = "+"
    count: int | None = None  # stop after this many valid samples
    as_json: bool = False  # print each payload as received (one JSON object per line)


def sample_line(sample: Sample) -> str:
    """One human-readable line per sample (what a labeling lead scans for)."""
    top = ",".join(f"{t.label}:{t.prob:.2f}" for t in sample.topk)
    shape = "x".join(str(d) for d in sample.input.shape)
    truth = f" truth={sample.truth}" if sample.truth is not None else ""
    return (
        f"{iso(sample.ts)} {sample.fleet_id}/{sample.device_id} {sample.model.name}@{sample.model.version} "
        f"predicted={sample.predicted} top={top} entropy={sample.entropy:.3f} margin={sample.margin:.3f} "
        f"reasons={','.join(sample.reasons)} input={sample.input.dtype}[{shape}]{truth} msg_id={sample.msg_id}"
    )


async def tail_samples(
    config: BridgeConfig,
    options: TailOptions,
    emit: Callable[[str], None],
    warn: Callable[[str], None],
    subscribed: Callable[[str], None] | None = None,
    stats: TailStats | None = None,
) -> TailStats:
    """Subscribe and `emit` one line per sample until `options.count` samples (or cancellation);
    counts go to `stats` (pass one in to read them after a cancellation)."""
    topics = config.topics
    topic = topics.filter(Channel.SAMPLES, options.fleet, options.device)
    stats = stats if stats is not None else TailStats()
    delay = _RECONNECT_MIN_S
    while True:
        try:
            async with _client(config) as client:
                await client.subscribe(topic, qos=1)
                delay = _RECONNECT_MIN_S
                if subscribed is not None:
                    subscribed(topic)
                async for message in client.messages:
                    payload = message.payload
                    if not isinstance(payload, bytes | bytearray):
                        payload = str(payload).encode()
                    if _handle(config, str(message.topic), bytes(payload), options, stats, emit, warn):
                        return stats
        except aiomqtt.MqttError as exc:
            warn(
                f"mqtt connection to {config.mqtt.host}:{config.mqtt.port} lost or refused: {exc}; "
                f"retry in {delay:.1f}s"
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX_S)


def _handle(
    config: BridgeConfig,
    topic: str,
    payload: bytes,
    options: TailOptions,
    stats: TailStats,
    emit: Callable[[str], None],
    warn: Callable[[str], None],
) -> bool:
    """Print one message; True once `options.count` samples were printed."""
    try:
        sample = decode_for_topic(config.topics, topic, payload)
        if not isinstance(sample, Sample):
            raise DecodeError(f"expected a sample/1 message, got {type(sample).__name__}")
    except DecodeError as exc:
        stats.invalid += 1
        warn(f"invalid sample on {topic}: {exc.field}: {exc.reason[:200]} (invalid so far: {stats.invalid})")
        return False
    emit(payload.decode() if options.as_json else sample_line(sample))
    stats.printed += 1
    return options.count is not None and stats.printed >= options.count


def _client(config: BridgeConfig) -> aiomqtt.Client:
    cfg = config.mqtt
    v5 = cfg.protocol == "mqtt5"
    return aiomqtt.Client(
        cfg.host,
        cfg.port,
        username=cfg.username,
        password=cfg.password,
        # Own id: sharing the bridge's id would kick the bridge off the broker.
        identifier=f"{cfg.client_id}-tail-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        # A clean, expiring session: nothing stays queued on the broker for a tail that has exited.
        clean_session=None if v5 else True,
        # paho refuses clean_start with 3.1.1 unless it is the default (MQTT_CLEAN_START_FIRST_ONLY).
        clean_start=True if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        keepalive=cfg.keepalive,
        tls_context=client_context(cfg.tls_ca, error=ConfigError) if cfg.tls_ca is not None else None,
    )
