"""A broker that ignores `$share` (amqtt, MQTT 3.1.1): the bridge notices and falls back to plain
subscriptions, or refuses to run when told to; a device deletes nothing the registry does not have.

Measured before this check existed: 1545 messages acknowledged by such a broker, 3 stored by the
bridge, no warning anywhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_bridge.app import running_bridge
from cloud_bridge.config import BridgeConfig, FleetConfig, IngestConfig, MqttConfig, RegistryConfig
from cloud_bridge.errors import ConfigError
from cloud_bridge.registry import ResultRow
from demokit.models import DemoModel
from devservers.amqtt import Amqtt
from tests.edge_harness import RunningNode, edge_config

INPUTS = 300


@pytest.fixture
def amqtt(tmp_path: Path) -> Iterator[Amqtt]:
    with Amqtt(tmp_path / "amqtt") as broker:
        yield broker


def _bridge_config(tmp_path: Path, port: int, fallback: bool) -> BridgeConfig:
    return BridgeConfig(
        state_dir=tmp_path / "bridge",
        mqtt=MqttConfig(port=port, protocol="mqtt311", keepalive=5),
        fleet=FleetConfig(shared=True, shared_fallback=fallback),
        registry=RegistryConfig(url=f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"),
        ingest=IngestConfig(confirm_interval_s=0.5),
    )


async def test_the_bridge_falls_back_to_plain_subscriptions_and_stores_everything(
    amqtt: Amqtt, demo_models: dict[str, DemoModel], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node_config = edge_config(
        tmp_path,
        amqtt.port,
        demo_models["edge"].path,
        mqtt={"protocol": "mqtt311"},
        routing={"escalate": False},
        telemetry={"interval_s": 1.0},
        source={"kind": "replay", "rate_hz": 100.0, "limit": INPUTS, "loop": False},
    )
    with caplog.at_level("ERROR", logger="cloud_bridge.mqtt"):
        async with running_bridge(_bridge_config(tmp_path, amqtt.port, fallback=True)) as bridge:
            assert "does not deliver shared subscriptions" in caplog.text
            async with RunningNode(node_config) as node:
                deadline = time.monotonic() + 60
                while node.processed < INPUTS or node.outbox is None or node.outbox.depth:
                    assert time.monotonic() < deadline, f"processed={node.processed} outbox={node.outbox}"
                    await asyncio.sleep(0.2)
                assert node.outbox.delivery.confirmed > 0
            rows = await bridge.registry.rows(ResultRow)
    # Nothing left the device's outbox that the registry does not hold.
    assert len({row["inference_id"] for row in rows}) == INPUTS


async def test_the_bridge_refuses_to_run_when_told_not_to_fall_back(amqtt: Amqtt, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not deliver shared subscriptions.*\[fleet\] shared = false"):
        async with running_bridge(_bridge_config(tmp_path, amqtt.port, fallback=False)):
            pass
