"""Escalations on their own MQTT session ([escalation] session = "own") are answered while ingestion
is stuck: a real bridge, a real Mosquitto, the registry's write lock held by another connection so
that no ingest batch commits and the main session's in-flight window stays full of unacknowledged
device messages. On the shared session the same requests wait behind that window."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_bridge.app import Bridge, running_bridge
from cloud_bridge.config import BridgeConfig, EscalationConfig, MqttConfig, RegistryConfig
from cloud_bridge.ingest.ingestor import IngestStats
from cloud_bridge.mqtt import MqttConnection
from demokit.dataset import DigitsSplit
from demokit.models import DemoModel
from schemas import Answer, ModelRef, Results, encode, new_msg_id
from schemas.topics import Channel
from tests.plugin_servers import MosquittoFactory
from tests.test_bridge_escalation import TOPICS, collect, request

pytestmark = pytest.mark.timeout(90)

WINDOW = 20  # the broker's in-flight limit towards each session, and the bridge's Receive Maximum
DEVICE_MESSAGES = 100
EDGE = ModelRef(name="digits-edge", version="1.0.0", sha256="ab" * 32)


def results(device: str, n: int) -> bytes:
    answer = Answer(
        inference_id=f"{device}-{n}", label="3", index=3, confidence=0.9, path="edge", edge_label="3", latency_ms=0.5
    )
    message = Results(
        msg_id=new_msg_id(), fleet_id="f1", device_id=device, ts=time.time(), model=EDGE, answers=[answer]
    )
    return encode(message)


async def until(condition: Callable[[], bool], limit_s: float = 20.0) -> None:
    """Poll a bridge counter (they have no event of their own) until `condition` holds."""
    async with asyncio.timeout(limit_s):
        while not condition():  # noqa: ASYNC110 (counters, not events)
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("session", ["own", "shared"])
async def test_escalations_are_answered_while_ingestion_cannot_commit(
    tmp_path: Path,
    mosquitto_factory: MosquittoFactory,
    demo_models: dict[str, DemoModel],
    digits: DigitsSplit,
    session: str,
) -> None:
    broker = mosquitto_factory(max_inflight_messages=WINDOW)
    db = tmp_path / "registry.db"
    config = BridgeConfig(
        state_dir=tmp_path / "state",
        status_interval_s=3600,
        mqtt=MqttConfig(host=broker.host, port=broker.port, client_id="bridge-sat", receive_maximum=WINDOW),
        registry=RegistryConfig(url=f"sqlite+aiosqlite:///{db}"),
        escalation=EscalationConfig(model=demo_models["cloud"].path, session=session),  # type: ignore[arg-type]
    )
    reply_topic = TOPICS.device("f1", "esc-dev", Channel.ESCALATE_REPLY)
    async with (
        running_bridge(config) as bridge,
        aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as device,
    ):
        assert (bridge.escalation_mqtt is not None) == (session == "own")
        await device.subscribe(reply_topic, qos=1)
        ingest, stats = _ingestion(bridge)
        lock = sqlite3.connect(db, timeout=5)
        lock.execute("BEGIN IMMEDIATE")  # every ingest commit now waits for this write lock
        try:
            for n in range(DEVICE_MESSAGES):
                await device.publish(TOPICS.device("f1", "dev-busy", Channel.RESULTS), results("dev-busy", n), qos=1)
            await until(lambda: ingest.unacked >= WINDOW)  # the main session's window is full
            for n in range(5):
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.ResponseTopic = reply_topic
                props.CorrelationData = f"c{n}".encode()
                req = request("esc-dev", digits.X_test[n], f"busy-{n}", "0", time.time() + 30)
                topic = TOPICS.device("f1", "esc-dev", Channel.ESCALATE)
                await device.publish(topic, encode(req), qos=1, properties=props)
            if session == "own":
                replies = await collect(device, 5, limit_s=15)
                assert stats.stored == 0 and ingest.unacked >= WINDOW  # ingestion is still stuck
            else:
                with pytest.raises(TimeoutError):
                    await collect(device, 1, limit_s=3)
        finally:
            lock.rollback()
            lock.close()
        if session == "shared":
            replies = await collect(device, 5, limit_s=30)  # once the commits go through
        await until(lambda: stats.stored == DEVICE_MESSAGES, 30)
    correlations = sorted(bytes(m.properties.CorrelationData) for m in replies)  # type: ignore[union-attr]
    assert correlations == [f"c{n}".encode() for n in range(5)]


def _ingestion(bridge: Bridge) -> tuple[MqttConnection, IngestStats]:
    assert bridge.mqtt is not None and bridge.ingestor is not None
    return bridge.mqtt, bridge.ingestor.stats
