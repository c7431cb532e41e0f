"""The bridge's own receive path on paho (cloud_bridge.paho_client.py): every PUBLISH a real broker
sends arrives with its topic, payload and the MQTT 5 properties the bridge uses, whatever other
properties it carries, over MQTT 5 and 3.1.1, in packets split across socket reads; QoS 2 still
goes through paho; acknowledgements written together all reach the broker."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_bridge.config import MqttConfig
from cloud_bridge.mqtt import Incoming, MqttConnection
from cloud_bridge.paho_client import _coalesce, _properties, publish_properties
from devservers import Mosquitto

TOPIC = "fleet/f1/dev-1/results"


def _props(**values: Any) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return props


PROPERTY_CASES: list[dict[str, Any]] = [
    {},
    {"ResponseTopic": "fleet/f1/dev-1/escalate/reply", "CorrelationData": b"\x00req-1\xff"},
    {
        "PayloadFormatIndicator": 1,
        "MessageExpiryInterval": 3600,
        "ContentType": "application/msgpack",
        "UserProperty": [("a", "1"), ("b", "two")],
        "ResponseTopic": "r/é",
        "CorrelationData": b"",
    },
    {"MessageExpiryInterval": 5, "UserProperty": [("k", "v")]},
]


@pytest.mark.parametrize("values", PROPERTY_CASES)
def test_properties_are_read_as_paho_packs_them(values: dict[str, Any]) -> None:
    packed = _props(**values).pack() + b"payload"  # type: ignore[no-untyped-call]
    response, correlation, end = _properties(packed, 0)
    assert (response, correlation) == (values.get("ResponseTopic"), values.get("CorrelationData"))
    assert packed[end:] == b"payload"


@pytest.mark.parametrize(
    ("correlation", "expiry"), [(None, None), (b"req-1", None), (None, 86_400), (b"\x00" * 300, 1), (b"", 30)]
)
def test_packed_publish_properties_are_the_bytes_paho_packs(correlation: bytes | None, expiry: int | None) -> None:
    packed = publish_properties(correlation, expiry)
    if correlation is None and expiry is None:
        assert packed is None
        return
    values: dict[str, Any] = {}
    if expiry is not None:
        values["MessageExpiryInterval"] = expiry
    if correlation is not None:
        values["CorrelationData"] = correlation
    assert packed is not None
    assert packed.pack() == _props(**values).pack()  # type: ignore[no-untyped-call]


async def test_published_properties_and_pubacks_go_through(mosquitto: Mosquitto) -> None:
    """What the bridge publishes reaches an MQTT 5 subscriber with its Correlation Data and expiry,
    and every publish completes on its PUBACK (the fast PUBACK path), many in flight at once."""
    got: list[tuple[bytes, Any]] = []
    done = threading.Event()

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        got.append((msg.payload, msg.properties))
        if len(got) == 300:
            done.set()

    subscribed = threading.Event()
    subscriber = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    subscriber.on_message = on_message
    subscriber.on_subscribe = lambda *_: subscribed.set()
    subscriber.connect(mosquitto.host, mosquitto.port)
    subscriber.subscribe("out/#", qos=1)
    subscriber.loop_start()
    config = MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id="publisher", publish_window=64)
    connection = MqttConnection(config, [], _Collector())
    ready = asyncio.Event()
    task = asyncio.create_task(connection.run(ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        assert await asyncio.to_thread(subscribed.wait, 10)
        sends = [
            connection.publish(
                f"out/{i}", str(i).encode(), 1, f"c{i}".encode() if i % 2 else None, message_expiry_s=600
            )
            for i in range(300)
        ]
        await asyncio.wait_for(asyncio.gather(*sends), 30)
        assert await asyncio.to_thread(done.wait, 10)
    finally:
        subscriber.loop_stop()
        subscriber.disconnect()
        await connection.close()
        await task
    for payload, props in got:
        i = int(payload)
        assert getattr(props, "CorrelationData", None) == (f"c{i}".encode() if i % 2 else None)
        assert 0 < props.MessageExpiryInterval <= 600


def test_coalescing_keeps_qos0_publishes_and_disconnects_on_their_own() -> None:
    def pkt(command: int, data: bytes, qos: int = 0, pos: int = 0) -> dict[str, Any]:
        return {"command": command, "mid": 0, "qos": qos, "pos": pos, "to_process": len(data) - pos, "packet": data}

    out: deque[Any] = deque(
        [
            pkt(paho.PUBACK, b"ab", pos=1),
            pkt(paho.PUBACK, b"cd"),
            pkt(paho.PUBLISH, b"ef", qos=1),
            pkt(paho.PUBLISH, b"gh"),
        ]
    )
    _coalesce(out)
    assert [p["packet"][p["pos"] :] for p in out] == [b"bcdef", b"gh"]  # the written part of the first only
    assert out[0]["to_process"] == 5
    out = deque([pkt(paho.DISCONNECT, b"x"), pkt(paho.PUBACK, b"y")])
    _coalesce(out)
    assert [p["packet"] for p in out] == [b"x", b"y"]


class _Collector:
    """Takes what a connection receives and acks it at once (the broker sends at most its in-flight
    limit unacked: 100 here under MQTT 3.1.1, where no Receive Maximum is sent)."""

    def __init__(self) -> None:
        self.items: list[Incoming] = []
        self.event = asyncio.Event()
        self.expect = 0
        self.connection: MqttConnection | None = None

    def __call__(self, incoming: Incoming) -> None:
        self.items.append(incoming)
        assert self.connection is not None and self.connection.ack(incoming)
        if len(self.items) >= self.expect:
            self.event.set()


def _publish_all(broker: Mosquitto, messages: list[tuple[bytes, int, Properties | None]], v5: bool) -> None:
    done = threading.Event()
    acked = 0

    def on_publish(*_: Any) -> None:
        nonlocal acked
        acked += 1
        if acked == len(messages):
            done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5 if v5 else paho.MQTTv311)
    client.on_publish = on_publish
    client.max_inflight_messages_set(1000)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for payload, qos, props in messages:
            client.publish(TOPIC, payload, qos=qos, properties=props if v5 else None)
        assert done.wait(30), f"{acked}/{len(messages)} publishes acknowledged"
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize("protocol", ["mqtt5", "mqtt311"])
async def test_every_publish_arrives_whole_with_its_properties_and_is_acked(
    mosquitto: Mosquitto, protocol: str
) -> None:
    v5 = protocol == "mqtt5"
    # Small and large payloads (past the 64 KiB read buffer), every property case, QoS 0, 1 and 2.
    sizes = [0, 1, 127, 128, 16_383, 16_384, 70_000, 200_000] + [300] * 500
    messages = []
    for i, size in enumerate(sizes):
        payload = i.to_bytes(4, "big") + bytes((i + j) % 251 for j in range(size))
        values = PROPERTY_CASES[i % len(PROPERTY_CASES)] if v5 else {}
        messages.append((payload, (1, 0, 2)[i % 3] if i < 60 else 1, _props(**values) if values else None))
    collector = _Collector()
    collector.expect = len(messages)
    config = MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id=f"receive-{protocol}", protocol=protocol)  # type: ignore[arg-type]
    connection = collector.connection = MqttConnection(config, [(TOPIC, 2)], collector)
    ready = asyncio.Event()
    task = asyncio.create_task(connection.run(ready))
    await asyncio.wait_for(ready.wait(), 10)
    await asyncio.to_thread(_publish_all, mosquitto, messages, v5)
    try:
        await asyncio.wait_for(collector.event.wait(), 30)
    except TimeoutError:
        ids = sorted(int.from_bytes(bytes(m.payload[:4]), "big") for m in collector.items)
        raise AssertionError(f"{len(ids)} {[i for i in range(len(messages)) if i not in ids][:30]}") from None
    got = collector.items
    assert all(m.topic == TOPIC for m in got)
    # QoS 2 messages reach the application at their PUBREL, so the order may differ; each is whole.
    by_payload = {bytes(m.payload): m for m in got}
    assert len(by_payload) == len(messages)
    for payload, qos, props in messages:
        m = by_payload[payload]
        assert m.qos == qos
        assert m.response_topic == getattr(props, "ResponseTopic", None)
        assert m.correlation_data == getattr(props, "CorrelationData", None)
    # Every message was acked as it came (acks written together), then reconnect: a broker that
    # missed an ack redelivers that message.
    assert connection.unacked == 0
    # A publish's PUBACK comes after the broker read every ack written before it (one TCP stream).
    await connection.publish("fleet/f1/dev-1/other", b"after the acks", qos=1)
    await connection.close()
    await task
    collector2 = _Collector()
    again = collector2.connection = MqttConnection(config, [(TOPIC, 2)], collector2)
    ready2 = asyncio.Event()
    task2 = asyncio.create_task(again.run(ready2))
    await asyncio.wait_for(ready2.wait(), 10)
    # A marker published after reconnecting arrives; nothing acknowledged before comes again.
    await asyncio.to_thread(_publish_all, mosquitto, [(b"marker", 1, None)], v5)
    collector2.expect = 1
    await asyncio.wait_for(collector2.event.wait(), 10)
    assert [m.payload for m in collector2.items] == [b"marker"]
    await again.close()
    await task2
