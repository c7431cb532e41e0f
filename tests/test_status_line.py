"""The edge node's periodic status line: connected, rates, escalations, outbox depth and the oldest
unsent message's age, logged at INFO every [node] status_interval_s (0: off), on a real node."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from demokit.models import DemoModel
from devservers import Mosquitto
from devservers.ports import free_port
from edge_node.status import StatusLine, oldest_created_at
from edge_node.telemetry import Window
from edge_node.uplink.outbox import Outbox, OutMessage, Priority
from schemas import Input, encode, encode_tensor
from tests.edge_harness import RunningNode, edge_config, wait_connected
from tests.poll import wait_for_async

pytestmark = pytest.mark.timeout(90)
LINE = re.compile(
    r"node status connected=(yes|no) inputs_per_s=([\d.]+) results_per_s=([\d.]+) escalations_sent=(\d+) "
    r"answered=(\d+) timed_out=(\d+) outbox_depth=(\d+) oldest_unsent_s=(\S+) published=(\d+) rejected=(\d+) "
    r"bytes_up=(\d+) bytes_down=(\d+)$"
)


def status_lines(caplog: pytest.LogCaptureFixture) -> list[re.Match[str]]:
    found = (LINE.search(r.getMessage()) for r in caplog.records if r.name == "edge_node.status")
    return [m for m in found if m is not None]


async def test_a_running_node_logs_its_status(
    tmp_path: Path, mosquitto: Mosquitto, demo_models: dict[str, DemoModel], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_node.status")
    config = edge_config(
        tmp_path,
        mosquitto.port,
        demo_models["edge"].path,
        node={"status_interval_s": 0.3},
        telemetry={"interval_s": 0.5},
        routing={"escalate": False},
    )
    x = np.zeros(64, np.float32)
    async with RunningNode(config) as node:
        await wait_connected(node)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            for n in range(30):  # ids a camera would make: no UUIDv7 needed
                message = Input(
                    msg_id=f"cam-{n}",
                    fleet_id="f1",
                    device_id="dev-1",
                    ts=time.time(),
                    input_id=f"i{n}",
                    tensor=encode_tensor(x),
                )
                await client.publish("fleet/f1/dev-1/input", encode(message), qos=1)
        status = node.status
        assert status is not None
        # Counted across the closed telemetry windows and the open one.
        await wait_for_async(lambda: status.totals().results, 20, "30 results counted", until=lambda n: n >= 30)
        await asyncio.sleep(0.7)  # a line after the last input
    lines = status_lines(caplog)
    assert len(lines) >= 2 and all(m[1] == "yes" for m in lines)
    assert sum(float(m[3]) for m in lines) > 0  # results were counted as a rate in some interval
    assert int(lines[-1][9]) > 0 and lines[-1][10] == "0"
    # What the link cost, both ways: 30 results and the telemetry went up, PUBACKs came down.
    assert int(lines[-1][11]) > 30 * 20 and int(lines[-1][12]) > 0


async def test_status_line_off_and_offline(tmp_path: Path, demo_models: dict[str, DemoModel]) -> None:
    off = edge_config(tmp_path / "off", free_port(), demo_models["edge"].path, node={"status_interval_s": 0})
    async with RunningNode(off) as node:
        assert node.status is None


async def test_the_oldest_unsent_message_and_depth(tmp_path: Path) -> None:
    outbox = await Outbox.open(tmp_path / "outbox.sqlite", 1 << 20)
    try:
        window = Window(8, time.time())
        line = StatusLine(1.0, outbox, lambda: False, lambda: 0, lambda: window)
        assert "outbox_depth=0 oldest_unsent_s=-" in line.line(time.time(), None)
        before = time.time()
        for n in range(3):
            await outbox.put(OutMessage(topic="t", payload=b"x", priority=Priority.RESULTS, msg_id=f"m{n}"))
        oldest = await asyncio.to_thread(oldest_created_at, outbox.path)
        assert oldest is not None and before <= oldest <= time.time()
        text = line.line(oldest + 12.5, oldest)
        assert "connected=no" in text and "outbox_depth=3 oldest_unsent_s=12.5 published=0" in text
    finally:
        await outbox.close()
    assert oldest_created_at(tmp_path / "missing.sqlite") is None
