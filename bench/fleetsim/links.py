"""The simulator's MQTT connections, driven from its one thread (no paho loop thread).

With paho's `loop_start()` every publish from the tick loop wrote a wake-up byte to paho's socket
pair and handed the packet to paho's thread, which then took the GIL to send it: two threads and
several system calls per message, on a machine whose cores the bridge needs. Here `publish()` sends
at once (paho writes directly when no loop thread runs), and `pump()` reads PUBACKs, replies and
commands, writes what a full socket buffer held back and keeps the connection alive, between ticks.
A reply's arrival time is taken when `pump()` reads it: at most one slot's visit late (tens of ms
against the devices' 2 s escalation timeout).
"""

from __future__ import annotations

import select
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

# QoS 1 publishes in flight per connection: paho scans them all at every PUBACK (1000 cost a tenth of
# the simulator's time), and its default of 20 caps a connection.
INFLIGHT = 256
SUBSCRIBE_CHUNK = 200  # filters per SUBSCRIBE packet

Inbox = deque[tuple[float, str, bytes]]


class Link:
    """One MQTT connection carrying many devices' traffic."""

    def __init__(self, host: str, port: int, client_id: str, inbox: Inbox) -> None:
        self.inbox = inbox
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(INFLIGHT)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_message
        self.subacks = 0
        self.client.on_subscribe = self._on_subscribe
        self.client.connect(host, port, keepalive=60)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.inbox.append((time.time(), msg.topic, msg.payload))

    def _on_subscribe(self, *_: Any) -> None:
        self.subacks += 1

    def subscribe(self, filters: list[tuple[str, int]]) -> int:
        """Send the SUBSCRIBE packets; returns how many SUBACKs to wait for (`subacks`)."""
        chunks = [filters[i : i + SUBSCRIBE_CHUNK] for i in range(0, len(filters), SUBSCRIBE_CHUNK)]
        for chunk in chunks:
            self.client.subscribe(chunk)
        return len(chunks)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain)

    def close(self) -> None:
        self.client.disconnect()


def pump(links: Sequence[Link], timeout: float) -> None:
    """Wait up to `timeout` for a socket to be readable (or writable, when paho holds unsent bytes),
    then read, write and run paho's keepalive for every link."""
    socks = {link.client.socket(): link for link in links}
    socks.pop(None, None)
    want_write = [s for s, link in socks.items() if link.client.want_write()]
    readable, writable, _ = select.select(list(socks), want_write, [], max(0.0, timeout))
    for s in readable:
        socks[s].client.loop_read()
    for s in writable:
        socks[s].client.loop_write()
    for link in links:
        link.client.loop_misc()


def pump_until(links: Sequence[Link], deadline: float, done: Any = None) -> bool:
    """Pump until `time.monotonic()` passes `deadline` or `done()` is true (returns whether it is)."""
    while True:
        if done is not None and done():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return done is not None and bool(done())
        pump(links, min(left, 0.05 if done is not None else left))
