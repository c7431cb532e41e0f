"""Escalation answers through a real broker with the real cloud demo model (MQTT 5 and 3.1.1)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import aiomqtt
import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_bridge.app import running_bridge
from cloud_bridge.config import BridgeConfig, EscalationConfig, MqttConfig
from cloud_bridge.escalation.escalator import CloudModel
from cloud_bridge.improve.escalation_value import EscalationValue, record_advice
from cloud_bridge.registry import Agreement, Registry
from demokit.dataset import DigitsSplit
from demokit.models import DemoModel
from devservers import Mosquitto
from schemas import EscalationReply, EscalationRequest, ModelRef, TopK, decode, encode, encode_tensor, new_msg_id
from schemas.topics import Channel, Topics

pytestmark = pytest.mark.timeout(60)

TOPICS = Topics("fleet")
EDGE = ModelRef(name="digits-edge", version="1.0.0", sha256="ab" * 32)


def bridge_config(tmp_path: Path, broker: Mosquitto, model: Path) -> BridgeConfig:
    return BridgeConfig(
        state_dir=str(tmp_path / "state"),
        mqtt=MqttConfig(host=broker.host, port=broker.port, client_id="bridge-esc"),
        escalation=EscalationConfig(model=str(model), max_batch=16),
    )


def request(device: str, x: np.ndarray, request_id: str, edge_label: str, deadline: float) -> EscalationRequest:
    return EscalationRequest(
        msg_id=new_msg_id(),
        fleet_id="f1",
        device_id=device,
        ts=time.time(),
        request_id=request_id,
        model=EDGE,
        input=encode_tensor(x.reshape(1, -1).astype(np.float32)),
        edge_topk=[TopK(label=edge_label, index=int(edge_label), prob=0.5)],
        deadline=deadline,
        reply_to=TOPICS.device("f1", device, Channel.ESCALATE_REPLY),
    )


def correct_indices(model: CloudModel, digits: DigitsSplit, n: int) -> list[int]:
    """Held-out inputs the cloud model labels correctly (it is ≈97 % accurate, not 100 %)."""
    predictions = model.predict(digits.X_test[:200].astype(np.float32))
    return [i for i, p in enumerate(predictions) if p.label == digits.labels[digits.y_test[i]]][:n]


async def collect(client: aiomqtt.Client, n: int, limit_s: float = 10.0) -> list[aiomqtt.Message]:
    got: list[aiomqtt.Message] = []
    async with asyncio.timeout(limit_s):
        async for message in client.messages:
            got.append(message)
            if len(got) == n:
                break
    return got


async def test_mqtt5_requests_answered_with_cloud_label_and_correlation(
    tmp_path: Path, mosquitto: Mosquitto, demo_models: dict[str, DemoModel], digits: DigitsSplit
) -> None:
    cloud = demo_models["cloud"]
    model = CloudModel(cloud.path)
    picks = correct_indices(model, digits, 12)
    config = bridge_config(tmp_path, mosquitto, cloud.path)
    reply_topic = TOPICS.device("f1", "dev-1", Channel.ESCALATE_REPLY)
    async with (
        running_bridge(config) as bridge,
        aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5) as client,
    ):
        await client.subscribe(reply_topic, qos=1)
        for n, i in enumerate(picks):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = reply_topic
            props.CorrelationData = f"corr-{n}".encode()
            # The edge (wrongly, on purpose for half of them) thought it was "0".
            req = request("dev-1", digits.X_test[i], f"req-{n}", "0", time.time() + 10)
            await client.publish(TOPICS.device("f1", "dev-1", Channel.ESCALATE), encode(req), qos=1, properties=props)
        replies = await collect(client, len(picks))
    # Read the agreement after the bridge drained: a reply can reach us before the bridge's publish
    # call has returned and counted it, and the drain flushes the counts into the registry.
    registry = Registry(config.registry_url)
    try:
        agreement = await registry.rows(Agreement)
    finally:
        await registry.close()

    by_corr = {bytes(m.properties.CorrelationData): decode(m.payload, EscalationReply) for m in replies}  # type: ignore[union-attr]
    assert sorted(by_corr) == sorted(f"corr-{n}".encode() for n in range(len(picks)))
    for n, i in enumerate(picks):
        reply = by_corr[f"corr-{n}".encode()]
        assert reply.request_id == f"req-{n}"
        assert reply.label == digits.labels[digits.y_test[i]]
        assert reply.device_id == "dev-1"
        assert reply.model is not None and reply.model.sha256 == cloud.sha256
        assert reply.confidence is not None and 0.0 < reply.confidence <= 1.0
        assert reply.topk[0].label == reply.label and len(reply.topk) == 3
    assert bridge.escalator is not None and bridge.escalator.stats.answered == len(picks)
    zeros = sum(1 for i in picks if digits.labels[digits.y_test[i]] == "0")
    assert agreement == [
        {"fleet_id": "f1", "device_id": "dev-1", "model_version": "1.0.0", "answered": len(picks), "agreed": zeros}
    ]


async def test_mqtt311_request_answered_on_reply_to(
    tmp_path: Path, mosquitto: Mosquitto, demo_models: dict[str, DemoModel], digits: DigitsSplit
) -> None:
    cloud = demo_models["cloud"]
    (i,) = correct_indices(CloudModel(cloud.path), digits, 1)
    config = bridge_config(tmp_path, mosquitto, cloud.path)
    reply_topic = TOPICS.device("f1", "gw-dev", Channel.ESCALATE_REPLY)
    async with (
        running_bridge(config),
        aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V311) as client,
    ):
        await client.subscribe(reply_topic, qos=1)
        req = request("gw-dev", digits.X_test[i], "legacy-1", "1", time.time() + 10)
        await client.publish(TOPICS.device("f1", "gw-dev", Channel.ESCALATE), encode(req), qos=1)
        (message,) = await collect(client, 1)
    reply = decode(message.payload, EscalationReply)
    assert message.topic.value == reply_topic
    assert reply.request_id == "legacy-1"
    assert reply.label == digits.labels[digits.y_test[i]]


async def test_expired_requests_are_skipped_and_counted(
    tmp_path: Path, mosquitto: Mosquitto, demo_models: dict[str, DemoModel], digits: DigitsSplit
) -> None:
    cloud = demo_models["cloud"]
    config = bridge_config(tmp_path, mosquitto, cloud.path)
    config = replace(config, escalation=replace(config.escalation, max_batch=4))
    reply_topic = TOPICS.device("f1", "dev-2", Channel.ESCALATE_REPLY)
    async with (
        running_bridge(config) as bridge,
        aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5) as client,
    ):
        await client.subscribe(reply_topic, qos=1)
        topic = TOPICS.device("f1", "dev-2", Channel.ESCALATE)
        for n in range(3):
            stale = request("dev-2", digits.X_test[n], f"late-{n}", "0", time.time() - 1)
            await client.publish(topic, encode(stale), qos=1)
        # A live request after the stale ones: its reply proves the stale ones were handled first.
        await client.publish(topic, encode(request("dev-2", digits.X_test[5], "live", "0", time.time() + 10)), qos=1)
        (message,) = await collect(client, 1)
    assert decode(message.payload, EscalationReply).request_id == "live"
    assert bridge.escalator is not None
    assert bridge.escalator.stats.expired == 3
    assert bridge.escalator.stats.answered == 1


async def test_request_the_model_cannot_take_is_refused_and_counted(
    tmp_path: Path, mosquitto: Mosquitto, demo_models: dict[str, DemoModel], digits: DigitsSplit
) -> None:
    config = bridge_config(tmp_path, mosquitto, demo_models["cloud"].path)
    reply_topic = TOPICS.device("f1", "dev-3", Channel.ESCALATE_REPLY)
    async with (
        running_bridge(config) as bridge,
        aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5) as client,
    ):
        await client.subscribe(reply_topic, qos=1)
        topic = TOPICS.device("f1", "dev-3", Channel.ESCALATE)
        wrong_shape = request("dev-3", np.zeros(65, dtype=np.float32), "bad", "0", time.time() + 10)
        await client.publish(topic, encode(wrong_shape), qos=1)
        await client.publish(topic, b"{not json", qos=1)
        await client.publish(topic, encode(request("dev-3", digits.X_test[0], "ok", "0", time.time() + 10)), qos=1)
        (message,) = await collect(client, 1)
    assert decode(message.payload, EscalationReply).request_id == "ok"
    assert bridge.escalator is not None
    assert bridge.escalator.stats.invalid == 2 and bridge.escalator.stats.answered == 1


async def test_replies_carry_the_pause_the_escalation_advice_holds_and_drop_it_when_the_advice_changes(
    tmp_path: Path, mosquitto: Mosquitto, demo_models: dict[str, DemoModel], digits: DigitsSplit
) -> None:
    """Where labeled samples showed the cloud no better than a device's model (`improve escalation
    --apply`), the bridge's replies to that device carry pause_s; a later assessment that says the
    cloud helps again takes it away. Read from the registry at start and on every status tick."""
    cloud = demo_models["cloud"]
    (i,) = correct_indices(CloudModel(cloud.path), digits, 1)
    config = bridge_config(tmp_path, mosquitto, cloud.path)

    def value(device: str, verdict: str) -> EscalationValue:
        return EscalationValue("f1", device, EDGE.version, 40, 0.9, 0.8 if verdict != "helps" else 0.95, verdict)

    async def ask(client: aiomqtt.Client, device: str, request_id: str) -> EscalationReply:
        req = request(device, digits.X_test[i], request_id, "1", time.time() + 10)
        await client.publish(TOPICS.device("f1", device, Channel.ESCALATE), encode(req), qos=1)
        (message,) = await collect(client, 1)
        return decode(message.payload, EscalationReply)

    registry = Registry(config.registry_url)
    await registry.create()
    try:
        await record_advice(registry, [value("dev-1", "does_not_help"), value("dev-2", "helps")], pause_s=900.0)
        async with (
            running_bridge(config) as bridge,
            aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5) as client,
        ):
            await client.subscribe(TOPICS.filter(Channel.ESCALATE_REPLY, "f1"), qos=1)
            first = await ask(client, "dev-1", "r-1")
            other = await ask(client, "dev-2", "r-2")
            await record_advice(registry, [value("dev-1", "helps")], pause_s=900.0)
            await bridge.refresh_advice()
            later = await ask(client, "dev-1", "r-3")
    finally:
        await registry.close()
    assert first.pause_s == 900.0 and first.label == digits.labels[digits.y_test[i]]
    assert other.pause_s is None and later.pause_s is None
