"""The registry on a real, private PostgreSQL server (started here as user `postgres` on a free port)."""

from __future__ import annotations

from pathlib import Path

import aiomqtt
import pytest

from cloud_bridge.app import running_bridge
from cloud_bridge.config import BridgeConfig, FleetConfig, MqttConfig, RegistryConfig
from cloud_bridge.registry import Agreement, Device, Registry, ResultRow, SampleRow, SeenMessage, TelemetryRow
from devservers import Mosquitto
from schemas import Alert, Result, Results, encode
from tests.factories import CHANNEL_OF, examples, topic_for

pytestmark = pytest.mark.timeout(90)


async def test_ingest_and_dedup_on_postgresql(tmp_path: Path, mosquitto: Mosquitto, postgres_url: str) -> None:
    messages = [m for m in examples("f1", "pg-1") if isinstance(m, (*CHANNEL_OF, Alert))]
    items = [(topic_for(m), encode(m)) for m in messages]
    config = BridgeConfig(
        state_dir=str(tmp_path / "state"),
        mqtt=MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id="bridge-pg"),
        fleet=FleetConfig(shared=True),
        registry=RegistryConfig(url=postgres_url),
    )
    for run in range(2):
        async with running_bridge(config) as bridge:
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
                for topic, payload in items:
                    await client.publish(topic, payload, qos=1)
            assert bridge.ingestor is not None
            await bridge.ingestor.wait_for(lambda s: s.stored + s.duplicates >= len(items))
            # The second run has a fresh cache: PostgreSQL's unique msg_id drops every copy.
            assert bridge.ingestor.stats.duplicates == (0 if run == 0 else len(items))
    registry = Registry(postgres_url)
    try:
        assert await registry.count(SeenMessage) == len(items)
        assert await registry.count(TelemetryRow) == 1 and await registry.count(SampleRow) == 1
        # One row per answer: the result/1 message's and each of the result/2 message's.
        results = next(m for m in messages if isinstance(m, Results))
        rows = await registry.rows(ResultRow)
        assert sorted((r["msg_id"], r["seq"], r["inference_id"]) for r in rows) == sorted(
            [(m.msg_id, 0, m.inference_id) for m in messages if isinstance(m, Result)]
            + [(results.msg_id, i, a.inference_id) for i, a in enumerate(results.answers)]
        )
        (device,) = await registry.rows(Device)
        assert device["messages"] == len(items)  # duplicates are not counted
        assert device["results"] == len(rows)
        assert device["online"] is True and device["model_version"] == "1.0.0"
        await registry.add_agreement([(("f1", "pg-1", "1.0.0"), (4, 3))])
        await registry.add_agreement([(("f1", "pg-1", "1.0.0"), (2, 2))])
        assert await registry.rows(Agreement) == [
            {"fleet_id": "f1", "device_id": "pg-1", "model_version": "1.0.0", "answered": 6, "agreed": 5}
        ]
    finally:
        await registry.close()
