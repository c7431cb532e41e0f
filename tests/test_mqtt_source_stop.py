"""A node fed a steady stream of MQTT inputs still stops: once its source task is cancelled, the
mqtt source takes no more inputs, so the drain (queued inputs, outstanding escalations) ends.

Before, a camera publishing at 20 Hz kept the intake and the escalations busy forever and
SIGTERM never finished (bench/footprint.py's nodes were killed after 30 s)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from demokit.models import DemoModel
from devservers import Mosquitto
from edge_node.input.intake import Intake
from edge_node.input.sources import InputIds, MqttInputSource
from schemas import Input, encode, encode_tensor, new_msg_id
from tests.edge_harness import RunningNode, edge_config, wait_connected
from tests.poll import wait_for_async

TOPIC = "fleet/f1/dev-1/input"


def _input(i: int) -> bytes:
    # All zeros: the demo edge model is unsure of it, so every input is escalated (nobody answers).
    x = np.zeros(64, np.float32)
    message = Input(
        msg_id=new_msg_id(),
        fleet_id="f1",
        device_id="dev-1",
        ts=time.time(),
        input_id=f"in-{i}",
        tensor=encode_tensor(x),
    )
    return encode(message)


class Camera:
    """Publishes an input every `period_s` until closed (a paho client on its own thread)."""

    def __init__(self, port: int, period_s: float = 0.02) -> None:
        self.sent = 0
        self._stop = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="camera")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)
        self._thread.start()

    def _run(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            self.client.publish(TOPIC, _input(self.sent), qos=1)
            self.sent += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.client.loop_stop()
        self.client.disconnect()


async def test_a_node_under_a_steady_input_stream_stops_when_asked(
    mosquitto: Mosquitto, demo_models: dict[str, DemoModel], tmp_path: Path
) -> None:
    config = edge_config(
        tmp_path,
        mosquitto.port,
        demo_models["edge"].path,
        routing={"escalation_timeout_s": 1.0},
        uplink={"results_max_delay_s": 0.0},
    )
    camera = Camera(mosquitto.port)
    try:
        # Leaving the block stops the node (and fails after 30 s if it does not: a hang guard;
        # the unanswered escalations end after their 1 s timeout) while the camera keeps publishing.
        async with RunningNode(config) as node:
            await wait_connected(node)
            await wait_for_async(lambda: node.processed >= 20, 30, "20 inputs answered")
        assert camera.sent > node.processed
    finally:
        camera.close()


async def test_the_mqtt_source_takes_no_input_once_its_task_is_cancelled() -> None:
    queue = Intake(maxsize=8)
    source = MqttInputSource(queue, InputIds())
    task = asyncio.create_task(source.run())
    await asyncio.sleep(0)
    source.offer(_input(0), TOPIC)
    assert queue.qsize() == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    source.offer(_input(1), TOPIC)
    assert queue.qsize() == 1 and source.dropped_stopping == 1
