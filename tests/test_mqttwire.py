"""devservers.mqttwire books every byte of a real MQTT conversation to the channel it belongs to."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devservers import Mosquitto, TcpProxy
from devservers.mqttwire import WireCounter, channel_of


def test_channels_of_device_topics() -> None:
    assert channel_of("fleet/f1/pi-0001/results") == "results"
    assert channel_of("fleet/f1/pi-0001/escalate/reply") == "escalate/reply"
    assert channel_of("fleet/f1/pi-0001/cmd/ack") == "cmd/ack"
    assert channel_of("fleet/f1/pi-0001/clock/reply") == "clock/reply"
    assert channel_of("fleet/f1/pi-0001/confirm") == "confirm"
    assert channel_of("fleet/f1/models/" + "a" * 64) == "models"
    assert channel_of("other") == "other"


@pytest.mark.parametrize("version", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_every_byte_through_the_proxy_is_booked_to_its_channel(mosquitto: Mosquitto, version: int) -> None:
    counter = WireCounter()
    proxy = TcpProxy("127.0.0.1", mosquitto.port, tap=counter.feed)
    proxy.start()
    acked = threading.Semaphore(0)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="wire", protocol=version)
    client.on_publish = lambda *_: acked.release()
    try:
        client.connect("127.0.0.1", proxy.port)
        client.loop_start()
        topic, payload, n = "fleet/f1/pi-0001/results", b"x" * 100, 20
        for i in range(n):
            props = None
            if version == mqtt.MQTTv5:
                # The first publish names the topic and its alias; the rest send the alias alone.
                props = Properties(PacketTypes.PUBLISH)
                props.TopicAlias = 1
            client.publish(topic if i == 0 or version != mqtt.MQTTv5 else "", payload, qos=1, properties=props)
        for _ in range(n):
            assert acked.acquire(timeout=10)
        client.disconnect()
        client.loop_stop()
        proxy.wait_until(lambda s: s.active_connections == 0, timeout=10)
    finally:
        proxy.stop()
    stats = proxy.stats()
    assert counter.total("up") == stats.bytes_up and counter.total("down") == stats.bytes_down
    assert counter.packets["up", "results"] == n and counter.packets["down", "ack:results"] == n

    def packet(remaining: int) -> int:  # + type byte + remaining-length varint
        return 1 + (1 if remaining < 128 else 2) + remaining

    if version == mqtt.MQTTv311:
        # topic 2+len, packet id 2, payload
        assert counter.bytes["up", "results"] == n * packet(2 + len(topic) + 2 + len(payload))
    else:
        # MQTT 5 adds properties (1 B length + 3 B alias); the alias replaces the topic after the first
        first = packet(2 + len(topic) + 2 + 1 + 3 + len(payload))
        rest = packet(2 + 2 + 1 + 3 + len(payload))
        assert counter.bytes["up", "results"] == first + (n - 1) * rest
    assert counter.bytes["up", "connect"] > 0 and counter.bytes["down", "connect"] > 0
