"""Telemetry into a real victoria-metrics (InfluxDB v2 write API): exact points, and no loss over an outage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import msgspec
import psutil
import pytest

from cloud_bridge.app import running_bridge
from cloud_bridge.config import BridgeConfig, InfluxConfig, MqttConfig
from cloud_bridge.tsdb import TsdbSettings, TsdbWriter, escape_tag, format_field, line, telemetry_lines
from devservers import InfluxDBError, Mosquitto, VictoriaMetrics
from schemas import Status, Telemetry, encode, new_msg_id
from schemas.topics import Channel, Topics
from tests.factories import examples
from tests.plugin_servers import InfluxDBFactory

pytestmark = pytest.mark.timeout(90)


def test_line_protocol_escaping() -> None:
    assert escape_tag("a b,c=d\\e") == "a\\ b\\,c\\=d\\\\e"
    assert format_field(3) == "3i"
    assert format_field(True) == "true"
    assert format_field(0.5) == "0.5"
    assert format_field('say "hi" \\') == '"say \\"hi\\" \\\\"'
    got = line("my meas,x", {"b": "2 2", "a": "1", "empty": ""}, {"f k": 1.0, "n": 2}, 1700000000123)
    assert got == "my\\ meas\\,x,a=1,b=2\\ 2 f\\ k=1.0,n=2i 1700000000123"


def test_telemetry_lines_cover_the_window() -> None:
    telemetry = next(m for m in examples() if isinstance(m, Telemetry))
    lines = telemetry_lines(telemetry)
    ts = str(round(telemetry.window_end * 1000))
    assert all(ln.endswith(" " + ts) for ln in lines)
    tags = "device=dev-1,fleet=f1,model=digits-edge,model_version=1.0.0"
    assert lines[0].startswith(f"inference,{tags} count=100i,rejected=2i,latency_p50=0.1,")
    assert "escalations_timed_out=2i" in lines[0] and "outbox_evicted=1i" in lines[0]
    assert "edge_latency_p95=0.2," in lines[0]
    assert f"class_counts,class=3,{tags} count=40i {ts}" in lines
    assert lines[-1] == f"device_status,{tags} online=1i {ts}"


async def wait_until(predicate: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Poll the writer's failure counter: a refused HTTP connection has no event to wait on."""
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def series(victoria: VictoriaMetrics, name: str) -> dict[tuple[tuple[str, str], ...], list[tuple[int, float]]]:
    out = {}
    for s in victoria.export(f'{{__name__="{name}"}}'):
        key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "db"))
        out[key] = list(zip(s.timestamps_ms, s.values, strict=True))
    return out


async def test_telemetry_lands_in_victoria_with_tags_fields_and_window_end(
    tmp_path: Path, mosquitto: Mosquitto, victoria: VictoriaMetrics
) -> None:
    telemetry = next(m for m in examples("f1", "dev-9") if isinstance(m, Telemetry))
    config = BridgeConfig(
        state_dir=str(tmp_path / "state"),
        mqtt=MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id="bridge-tsdb"),
        influx=InfluxConfig(url=victoria.url, flush_interval_s=0.05),
    )
    async with running_bridge(config) as bridge:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            topic = Topics().device("f1", "dev-9", Channel.TELEMETRY)
            await client.publish(topic, encode(telemetry), qos=1)
        assert bridge.tsdb is not None and bridge.ingestor is not None
        async with asyncio.timeout(10):
            await bridge.ingestor.wait_for(lambda s: s.stored == 1)
        assert await bridge.tsdb.flush(deadline_s=10)
        assert bridge.tsdb.written == 4
    ts = round(telemetry.window_end * 1000)
    tags = (("device", "dev-9"), ("fleet", "f1"), ("model", "digits-edge"), ("model_version", "1.0.0"))
    assert await asyncio.to_thread(series, victoria, "inference_count") == {tags: [(ts, 100.0)]}
    assert await asyncio.to_thread(series, victoria, "inference_latency_p99") == {tags: [(ts, 0.5)]}
    assert await asyncio.to_thread(series, victoria, "inference_edge_latency_p95") == {tags: [(ts, 0.2)]}
    assert await asyncio.to_thread(series, victoria, "inference_confidence_p05") == {tags: [(ts, 0.61)]}
    assert await asyncio.to_thread(series, victoria, "device_status_online") == {tags: [(ts, 1.0)]}
    classes = await asyncio.to_thread(series, victoria, "class_counts_count")
    assert classes == {
        tuple(sorted((*tags, ("class", "3")))): [(ts, 40.0)],
        tuple(sorted((*tags, ("class", "8")))): [(ts, 60.0)],
    }


async def test_a_last_will_is_the_latest_status_point_though_prepared_before_the_telemetry(
    tmp_path: Path, mosquitto: Mosquitto, victoria: VictoriaMetrics
) -> None:
    """A will's ts is when the device prepared it, at CONNECT, before that connection's telemetry;
    status points are stamped when the bridge took them, so Grafana's last status of a device whose
    link died is offline."""
    now = time.time()
    telemetry = next(m for m in examples("f1", "dev-8") if isinstance(m, Telemetry))
    telemetry = msgspec.structs.replace(telemetry, ts=now - 5, window_start=now - 15, window_end=now - 5)
    birth = next(m for m in examples("f1", "dev-8") if isinstance(m, Status))
    will = msgspec.structs.replace(birth, msg_id=new_msg_id(), state="offline", reason="connection_lost", ts=now - 600)
    config = BridgeConfig(
        state_dir=str(tmp_path / "state"),
        mqtt=MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id="bridge-tsdb-will"),
        influx=InfluxConfig(url=victoria.url, flush_interval_s=0.05),
    )
    topics = Topics()
    async with running_bridge(config) as bridge:
        assert bridge.tsdb is not None and bridge.ingestor is not None
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            await client.publish(topics.device("f1", "dev-8", Channel.TELEMETRY), encode(telemetry), qos=1)
            async with asyncio.timeout(10):
                await bridge.ingestor.wait_for(lambda s: s.stored == 1)
            await client.publish(topics.device("f1", "dev-8", Channel.STATUS), encode(will), qos=1)
        async with asyncio.timeout(10):
            await bridge.ingestor.wait_for(lambda s: s.stored == 2)
        assert await bridge.tsdb.flush(deadline_s=10)
    (online,) = (await asyncio.to_thread(series, victoria, "device_status_online")).values()
    assert [value for _, value in sorted(online)] == [1.0, 0.0]  # the window's online, then the will
    assert max(ts for ts, _ in online) >= round(now * 1000)


def points(n0: int, n: int, base_ms: int) -> list[str]:
    return [f"outage_test,device=d{i % 3} value={i}i {base_ms + i}" for i in range(n0, n0 + n)]


async def test_tsdb_outage_loses_nothing(tmp_path: Path, victoria: VictoriaMetrics) -> None:
    base_ms = int(time.time() * 1000) - 60_000
    settings = TsdbSettings(
        url=victoria.url,
        org="o",
        bucket="b",
        token="",
        spill_path=tmp_path / "spill.lp",
        batch_lines=100,
        flush_interval_s=0.05,
        buffer_max_lines=300,
        retry_max_s=0.2,
    )
    writer = TsdbWriter(settings)
    task = asyncio.create_task(writer.run())
    writer.add(points(0, 500, base_ms))
    assert await writer.flush(deadline_s=10)
    # Make what victoria acknowledged durable, then crash it mid-stream.
    await asyncio.to_thread(victoria.persist)
    await asyncio.to_thread(victoria.kill)
    for start in range(500, 1500, 250):
        writer.add(points(start, 250, base_ms))
    await wait_until(lambda: writer.failures > 0)
    assert settings.spill_path.exists(), "lines beyond the memory bound must go to the spill file"
    assert writer.pending == 1000
    await asyncio.to_thread(victoria.start)
    assert await writer.flush(deadline_s=20)
    await writer.close()
    await task
    writer.dispose()
    exported = await asyncio.to_thread(victoria.export, '{__name__="outage_test_value"}')
    values = sorted(int(v) for s in exported for v in s.values)
    assert values == list(range(1500))
    assert not settings.spill_path.exists()


async def test_lines_left_at_close_while_tsdb_down_are_replayed_by_the_next_writer(
    tmp_path: Path, victoria: VictoriaMetrics
) -> None:
    base_ms = int(time.time() * 1000) - 60_000
    settings = TsdbSettings(
        url=victoria.url,
        org="o",
        bucket="b",
        token="",
        spill_path=tmp_path / "spill.lp",
        batch_lines=100,
        flush_interval_s=0.05,
        retry_max_s=0.2,
    )
    await asyncio.to_thread(victoria.stop)
    first = TsdbWriter(settings)
    task = asyncio.create_task(first.run())
    first.add(points(0, 120, base_ms))
    await wait_until(lambda: first.failures > 0)
    await first.close()
    await task
    first.dispose()
    assert first.pending == 120
    await asyncio.to_thread(victoria.start)
    second = TsdbWriter(settings)
    task = asyncio.create_task(second.run())
    assert await second.flush(deadline_s=10)
    await second.close()
    await task
    second.dispose()
    exported = await asyncio.to_thread(victoria.export, '{__name__="outage_test_value"}')
    assert sorted(int(v) for s in exported for v in s.values) == list(range(120))


# -- the InfluxDB 1.x test server ------------------------------------------------------------------


def test_influxdb_devserver_listens_only_on_its_own_ports_and_keeps_data(influxdb_factory: InfluxDBFactory) -> None:
    server = influxdb_factory(auth=True)
    listening = {c.laddr.port for c in psutil.Process(server.pid).net_connections() if c.status == "LISTEN"}
    assert listening == {server.port, server.rpc_port} and not listening & {8086, 8088, 8082}
    server.create_database("keep")
    server.write_lines(["m,t=a v=1 1700000000000"], "keep")
    server.restart()
    (result,) = server.query('SELECT "v" FROM "m"', "keep")
    assert result["series"][0]["values"] == [[1700000000000, 1]]
    # auth is on: without credentials the server refuses the query.
    with pytest.raises(InfluxDBError, match="401"):
        server.query("SHOW DATABASES", auth=False)
