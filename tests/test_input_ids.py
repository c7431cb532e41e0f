"""input/1 takes any unique msg_id a third-party producer can make (uuidgen's UUIDv4, a camera's
counter), bounded and printable; the device still drops a repeat. Every message a device sends
keeps its UUIDv7."""

from __future__ import annotations

import re
import time
import typing
from pathlib import Path

import msgspec
import numpy as np
import pytest

from edge_node.input.intake import Intake
from edge_node.input.sources import InputIds, MqttInputSource
from schemas import Input, decode, decode_tensor, encode_tensor
from schemas.messages import ALL_MESSAGES
from schemas.msgid import MSG_ID_PATTERN

TOPIC = "fleet/f1/dev-1/input"


def payload(msg_id: str, input_id: str) -> bytes:
    tensor = msgspec.to_builtins(encode_tensor(np.zeros(64, np.float32)))
    body = {"schema": "input/1", "msg_id": msg_id, "fleet_id": "f1", "device_id": "dev-1", "ts": time.time()}
    return msgspec.json.encode({**body, "input_id": input_id, "tensor": tensor})


async def test_the_mqtt_source_takes_any_unique_id_and_drops_repeats() -> None:
    intake = Intake(maxsize=16)
    source = MqttInputSource(intake, InputIds())
    ids = [
        "0f8fad5b-d9cb-469f-a165-70867728950e",
        "cam-7/frame 000123",
        "x" * 128,
        "0f8fad5b-d9cb-469f-a165-70867728950e",
    ]
    for n, msg_id in enumerate(ids):
        source.offer(payload(msg_id, f"in-{n}"), TOPIC)
    items = intake.get_batch_nowait(16)
    assert [i.input_id for i in items] == ["in-0", "in-1", "in-2"] and source.duplicates == 1
    assert all(i.error is None for i in items) and items[1].source_ref == "mqtt:cam-7/frame 000123"


@pytest.mark.parametrize("msg_id", ["", "y" * 129, "line\nbreak", "nul\x00", "del\x7f"])
async def test_an_unusable_id_is_an_undecodable_input(msg_id: str) -> None:
    intake = Intake(maxsize=4)
    MqttInputSource(intake, InputIds()).offer(payload(msg_id, "in-1"), TOPIC)
    (item,) = intake.get_batch_nowait(4)
    assert item.error is not None and "undecodable" in str(item.error) and "msg_id" in str(item.error)


def test_every_message_but_input_keeps_uuid7_ids() -> None:
    for message in ALL_MESSAGES:
        meta = typing.get_type_hints(message, include_extras=True)["msg_id"].__metadata__[0]
        if message is Input:
            assert meta.pattern != MSG_ID_PATTERN and meta.max_length == 128
        else:
            assert meta.pattern == MSG_ID_PATTERN, message


def test_the_readme_input_example_decodes() -> None:
    """README's one-line publisher sends an input/1 the device takes as it is."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (body,) = re.findall(r"mosquitto_pub .* -t fleet/demo/pi-0001/input -m '(.*)'", readme)
    message = decode(body.encode(), Input)
    assert message.msg_id == "cam-7-000123" and decode_tensor(message.tensor).shape == (64,)
