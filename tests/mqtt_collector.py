"""A real paho-mqtt subscriber that records what arrives, for asserting on a test's traffic."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

from schemas import Topics, decode_for_topic
from schemas.messages import Envelope


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    properties: Any

    def message(self, topics: Topics | None = None) -> Envelope:
        return decode_for_topic(topics or Topics(), self.topic, self.payload)


@dataclass
class Collector:
    host: str
    port: int
    topics: list[str]
    client_id: str = "collector"
    received: list[Received] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _subscribed: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.received.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.properties))
            self._cond.notify_all()

    def __enter__(self) -> Collector:
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        assert self._subscribed.wait(10), "collector could not subscribe"
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def on(self, suffix: str) -> list[Received]:
        with self._cond:
            return [r for r in self.received if r.topic.endswith("/" + suffix)]

    def wait_for(self, predicate: Callable[[Collector], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    counts = {}
                    for r in self.received:
                        key = r.topic.rsplit("/", 1)[-1]
                        counts[key] = counts.get(key, 0) + 1
                    raise AssertionError(f"timed out waiting; received so far by channel: {counts}")
                self._cond.wait(left)

    def publish(self, topic: str, payload: bytes, properties: Properties | None = None) -> None:
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        info.wait_for_publish(10)
