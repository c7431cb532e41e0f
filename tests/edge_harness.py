"""Helpers to run a real EdgeNode in-process against a real broker, and a stand-in cloud model."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common.config import from_dict
from common.files import file_sha256
from common.numeric import softmax
from edge_node.app import EdgeNode
from edge_node.config import EdgeConfig
from edge_node.errors import ConfigError
from schemas import EscalationReply, EscalationRequest, ModelRef, TopK, decode, decode_tensor, encode, new_msg_id
from tests.config_files import edge_tables


def edge_config(tmp_path: Path, port: int, model: Path, **sections: dict[str, Any]) -> EdgeConfig:
    """`edge_tables(...)` built in code, with the same conversion and checks as a TOML file."""
    return from_dict(EdgeConfig, edge_tables(tmp_path, port, model, **sections), tmp_path, ConfigError)


class RunningNode:
    """`async with RunningNode(config) as node:` runs the node; leaving the block drains and stops it."""

    def __init__(self, config: EdgeConfig) -> None:
        self.node = EdgeNode(config)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EdgeNode:
        self.task = asyncio.create_task(self.node.run())
        ready = asyncio.create_task(self.node.ready.wait())
        done, _ = await asyncio.wait({self.task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            ready.cancel()
            self.task.result()  # raises what made the node fail at start
        assert ready in done, "edge node did not become ready in 30 s"
        return self.node

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.node.stop()
        await asyncio.wait_for(self.task, timeout=30)


async def wait_connected(node: EdgeNode) -> None:
    assert node.link is not None
    async with asyncio.timeout(15):
        await node.link.wait_connected()


class CloudResponder:
    """A stand-in for the cloud bridge's escalation worker: answers with the real cloud model."""

    def __init__(
        self, host: str, port: int, model_path: Path, *, delay_s: float = 0.0, pause_s: float | None = None
    ) -> None:
        self.session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.labels = json.loads(meta["labels"])
        self.logits = meta.get("output_kind") == "logits"
        self.ref = ModelRef(name=meta["model_name"], version=meta["model_version"], sha256=file_sha256(model_path))
        self.delay_s = delay_s
        self.pause_s = pause_s  # set on every reply: "the cloud does not help here"
        self.answered = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cloud-responder", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe("fleet/+/+/escalate", 1)
        self.host, self.port = host, port

    def __enter__(self) -> CloudResponder:
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        request = decode(msg.payload, EscalationRequest)
        if self.delay_s:
            time.sleep(self.delay_s)
        x = decode_tensor(request.input).reshape(1, -1).astype(np.float32)
        out = np.asarray(self.session.run(None, {self.session.get_inputs()[0].name: x})[0], dtype=np.float32)
        probs = softmax(out)[0] if self.logits else out[0]
        i = int(probs.argmax())
        reply = EscalationReply(
            msg_id=new_msg_id(),
            fleet_id=request.fleet_id,
            device_id=request.device_id,
            ts=time.time(),
            request_id=request.request_id,
            model=self.ref,
            label=self.labels[i],
            index=i,
            confidence=float(min(probs[i], 1.0)),
            topk=[TopK(label=self.labels[i], index=i, prob=float(min(probs[i], 1.0)))],
            pause_s=self.pause_s,
        )
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        corr = getattr(msg.properties, "CorrelationData", None)
        if corr is not None:
            props.CorrelationData = corr
        topic = getattr(msg.properties, "ResponseTopic", None) or request.reply_to
        client.publish(topic, encode(reply), qos=1, properties=props)
        self.answered += 1
