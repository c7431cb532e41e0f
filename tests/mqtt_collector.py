"""A real paho-mqtt subscriber that records what arrives, for asserting on a test's traffic."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

from schemas import Answer, ModelRef, Result, Results, Topics, decode_for_topic
from schemas.messages import Envelope


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    properties: Any

    def message(self, topics: Topics | None = None) -> Envelope:
        return decode_for_topic(topics or Topics(), self.topic, self.payload)


@dataclass(frozen=True)
class Answered:
    """One input's final answer with the envelope of the message that carried it (result/1 carries
    one answer, result/2 a batch): what a test asserts on, one per input."""

    msg_id: str
    fleet_id: str
    device_id: str
    ts: float
    model: ModelRef
    inference_id: str
    label: str
    index: int
    confidence: float
    path: str
    fallback_reason: str | None
    edge_label: str
    cloud_label: str | None
    latency_ms: float
    source_ref: str | None
    truth: str | None

    @classmethod
    def of(cls, message: Envelope) -> list[Answered]:
        if isinstance(message, Result):
            answers: list[Result | Answer] = [message]
        elif isinstance(message, Results):
            answers = list(message.answers)
        else:
            raise TypeError(f"not a result message: {type(message).__name__}")
        m = message
        return [
            cls(
                m.msg_id,
                m.fleet_id,
                m.device_id,
                m.ts,
                m.model,
                a.inference_id,
                a.label,
                a.index,
                a.confidence,
                a.path,
                a.fallback_reason,
                a.edge_label,
                a.cloud_label,
                a.latency_ms,
                a.source_ref,
                a.truth,
            )
            for a in answers
        ]


def answers(received: list[Received], topics: Topics | None = None) -> list[Answered]:
    """Every answer in these result messages, in arrival order."""
    return [a for r in received for a in Answered.of(r.message(topics))]


@dataclass
class Collector:
    host: str
    port: int
    topics: list[str]
    client_id: str = "collector"
    received: list[Received] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _subscribed: threading.Event = field(default_factory=threading.Event)
    _answers: list[Answered] = field(default_factory=list)
    _decoded_upto: int = 0

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

    def answers(self) -> list[Answered]:
        """Every answer received on .../results so far (decoded once per message)."""
        with self._cond:
            # One message at a time: a payload that fails to decode fails every call, not just the
            # first one (which would leave the messages after it undecoded for good).
            while self._decoded_upto < len(self.received):
                r = self.received[self._decoded_upto]
                if r.topic.endswith("/results"):
                    self._answers.extend(Answered.of(r.message()))
                self._decoded_upto += 1
            return list(self._answers)

    def wait_for(self, predicate: Callable[[Collector], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    counts: dict[str, int] = {}
                    for r in self.received:
                        key = r.topic.rsplit("/", 1)[-1]
                        counts[key] = counts.get(key, 0) + 1
                    raise AssertionError(
                        f"timed out waiting; received so far by channel: {counts}"
                        f" (answers decoded from results: {len(self._answers)})"
                    )
                self._cond.wait(left)

    def publish(self, topic: str, payload: bytes, properties: Properties | None = None) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK. Blocking: from a test coroutine that
        shares its event loop with a node, use `publish_many` in a thread (`asyncio.to_thread`), or
        the node's loop (and its MQTT keep-alive) stands still while this waits."""
        self.publish_many(topic, [payload], properties)

    def publish_many(self, topic: str, payloads: Sequence[bytes], properties: Properties | None = None) -> None:
        """Publish every payload at QoS 1 (pipelined), then wait until the broker acknowledged each."""
        infos = [self.client.publish(topic, payload, qos=1, properties=properties) for payload in payloads]
        for info in infos:
            info.wait_for_publish(10)
            if not info.is_published():
                raise AssertionError(f"the broker did not acknowledge a publish to {topic} within 10 s")
