"""Telemetry into real TSDBs: victoria-metrics (the v2 write API) and InfluxDB 1.6.7 (the 1.x write API).

Exact points, no loss over an outage; refusals: a missing database or bad credentials are reported
once and probed slowly with the lines kept, bad lines are dropped and counted, and the spill's byte
bound holds with the oldest lines dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

import aiomqtt
import msgspec
import psutil
import pytest

from cloud_bridge.app import running_bridge
from cloud_bridge.config import BridgeConfig, InfluxConfig, MqttConfig
from cloud_bridge.tsdb import TsdbSettings, TsdbWriter, escape_tag, format_field, line, telemetry_lines
from devservers import InfluxDB, InfluxDBError, Mosquitto, VictoriaMetrics, free_port
from schemas import Status, Telemetry, encode, new_msg_id
from schemas.topics import Channel, Topics
from tests.factories import examples
from tests.plugin_servers import InfluxDBFactory
from tests.poll import wait_for_async

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
    tags = "device=dev-1,fleet=f1,model=digits-edge,version=1.0.0"
    assert lines[0].startswith(f"inference,{tags} count=100i,rejected=2i,latency_p50=0.1,")
    assert "escalations_timed_out=2i" in lines[0] and "outbox_evicted=1i" in lines[0]
    assert "edge_latency_p95=0.2," in lines[0]
    assert f"class_counts,class=3,{tags} count=40i {ts}" in lines
    assert lines[-1] == f"device_status,{tags} online=1i {ts}"


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
    tags = (("device", "dev-9"), ("fleet", "f1"), ("model", "digits-edge"), ("version", "1.0.0"))
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
        spill_path=tmp_path / "spill",
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
    await wait_for_async(lambda: writer.failures, 10, "a failed write", until=lambda n: n > 0)
    assert writer.spilled > 0 and any(settings.spill_path.iterdir()), "lines beyond the memory bound must be spilled"
    assert writer.pending == 1000
    await asyncio.to_thread(victoria.start)
    assert await writer.flush(deadline_s=20)
    await writer.close()
    await task
    writer.dispose()
    exported = await asyncio.to_thread(victoria.export, '{__name__="outage_test_value"}')
    values = sorted(int(v) for s in exported for v in s.values)
    assert values == list(range(1500))
    assert not any(settings.spill_path.iterdir()), "a replayed spill leaves no segment behind"


async def test_lines_left_at_close_while_tsdb_down_are_replayed_by_the_next_writer(
    tmp_path: Path, victoria: VictoriaMetrics
) -> None:
    base_ms = int(time.time() * 1000) - 60_000
    settings = TsdbSettings(
        url=victoria.url,
        org="o",
        bucket="b",
        token="",
        spill_path=tmp_path / "spill",
        batch_lines=100,
        flush_interval_s=0.05,
        retry_max_s=0.2,
    )
    await asyncio.to_thread(victoria.stop)
    first = TsdbWriter(settings)
    task = asyncio.create_task(first.run())
    first.add(points(0, 120, base_ms))
    await wait_for_async(lambda: first.failures, 10, "a failed write", until=lambda n: n > 0)
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


# -- InfluxDB 1.x: the v1 write API and what the writer does with refusals ---------------------------


def v1_settings(server: InfluxDB, tmp_path: Path, database: str, **overrides: object) -> TsdbSettings:
    options: dict[str, object] = {
        "url": server.url,
        "api": "v1",
        "database": database,
        "spill_path": tmp_path / "spill",
        "batch_lines": 100,
        "flush_interval_s": 0.05,
        "retry_max_s": 0.2,
        "blocked_retry_s": 0.5,
    }
    options.update(overrides)
    return TsdbSettings(**options)  # type: ignore[arg-type]


def fresh_db() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"


def values(server: InfluxDB, db: str, measurement: str = "outage_test") -> list[int]:
    (result,) = server.query(f'SELECT "value" FROM "{measurement}"', db)
    return sorted(int(v) for s in result.get("series", []) for _, v in s["values"])


async def test_v1_api_writes_telemetry_to_influxdb_1x_and_the_status_line_counts_it(
    tmp_path: Path, mosquitto: Mosquitto, influxdb_session: InfluxDB, caplog: pytest.LogCaptureFixture
) -> None:
    db = fresh_db()
    influxdb_session.create_database(db)
    telemetry = next(m for m in examples("f1", "dev-v1") if isinstance(m, Telemetry))
    config = BridgeConfig(
        state_dir=str(tmp_path / "state"),
        mqtt=MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id="bridge-tsdb-v1"),
        influx=InfluxConfig(url=influxdb_session.url, api="v1", database=db, flush_interval_s=0.05),
    )
    async with running_bridge(config) as bridge:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            await client.publish(Topics().device("f1", "dev-v1", Channel.TELEMETRY), encode(telemetry), qos=1)
        assert bridge.tsdb is not None and bridge.ingestor is not None
        async with asyncio.timeout(10):
            await bridge.ingestor.wait_for(lambda s: s.stored == 1)
        assert await bridge.tsdb.flush(deadline_s=10)
        with caplog.at_level(logging.INFO, logger="cloud_bridge.app"):
            bridge.log_status()
    (status,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bridge status")]
    assert "tsdb_written=4 tsdb_pending=0 tsdb_spill_bytes=0 tsdb_failures=0 tsdb_rejected=0" in status
    assert "tsdb_dropped=0 tsdb_refused=0 tsdb_blocked=no" in status
    # Drift's window (a new device: its state row created, not a cache miss), and the
    # confirmations: nothing sent yet, the device's outbox epoch is unknown (it sent no status).
    assert "drift_windows=1 drift_alerts=0 drift_cache_hits=0 drift_cache_misses=0" in status
    assert "confirms=0 confirmed_seqs=0 confirms_failed=0" in status
    ts = round(telemetry.window_end * 1000)
    (result,) = influxdb_session.query(
        'SELECT "count", "latency_p99", "edge_latency_p95" FROM "inference" GROUP BY *', db
    )
    (series,) = result["series"]
    assert series["tags"] == {"device": "dev-v1", "fleet": "f1", "model": "digits-edge", "version": "1.0.0"}
    assert series["values"] == [[ts, 100, 0.5, 0.2]]
    (result,) = influxdb_session.query('SELECT "count" FROM "class_counts" GROUP BY "class"', db)
    assert {s["tags"]["class"]: s["values"] for s in result["series"]} == {"3": [[ts, 40]], "8": [[ts, 60]]}


async def test_a_missing_database_is_reported_once_probed_slowly_and_written_once_created(
    tmp_path: Path, influxdb_session: InfluxDB, caplog: pytest.LogCaptureFixture
) -> None:
    db = fresh_db()
    writer = TsdbWriter(v1_settings(influxdb_session, tmp_path, db, buffer_max_lines=50))
    task = asyncio.create_task(writer.run())
    base_ms = int(time.time() * 1000) - 60_000
    with caplog.at_level(logging.INFO, logger="cloud_bridge.tsdb"):
        writer.add(points(0, 120, base_ms))
        await wait_for_async(lambda: writer.blocked, 10, "the writer to report itself blocked")
        before = len(influxdb_session.http_requests(f"/write?db={db}"))
        # New lines keep arriving; they must not shorten the probe interval (0.5 s here).
        for start in range(120, 300, 20):
            writer.add(points(start, 20, base_ms))
            await asyncio.sleep(0.2)
        probes = influxdb_session.http_requests(f"/write?db={db}")
        assert set(probes) == {404} and len(probes) - before <= 5, probes
        assert writer.pending == 300 and writer.spilled == 250 and writer.written == 0
        assert f"tsdb_refused={writer.blocked_attempts} tsdb_blocked=yes" in writer.status()
        assert abs(writer.blocked_attempts - len(probes)) <= 1  # a probe may be between server and writer
        influxdb_session.create_database(db)
        assert await writer.flush(deadline_s=10)
        await writer.close()
        await task
    writer.dispose()
    assert values(influxdb_session, db) == list(range(300))
    assert writer.blocked is None and writer.rejected == 0 and writer.dropped == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "database not found" in errors[0] and "CREATE DATABASE" in errors[0] and "kept" in errors[0]
    assert any("accepted again" in r.getMessage() for r in caplog.records)


async def test_bad_lines_are_dropped_counted_and_never_resent(
    tmp_path: Path, influxdb_session: InfluxDB, caplog: pytest.LogCaptureFixture
) -> None:
    db = fresh_db()
    influxdb_session.create_database(db)
    writer = TsdbWriter(v1_settings(influxdb_session, tmp_path, db))
    task = asyncio.create_task(writer.run())
    base_ms = int(time.time() * 1000) - 60_000
    with caplog.at_level(logging.INFO, logger="cloud_bridge.tsdb"):
        writer.add([*points(0, 3, base_ms), "not line protocol"])
        assert await writer.flush(deadline_s=10)
        # A field that changes type: InfluxDB keeps the first type and refuses the other line.
        writer.add([*points(3, 2, base_ms), f'outage_test,device=d0 value="text" {base_ms + 99}'])
        assert await writer.flush(deadline_s=10)
        await writer.close()
        await task
    writer.dispose()
    assert values(influxdb_session, db) == [0, 1, 2, 3, 4]  # the valid lines of both batches
    assert writer.rejected == 7 and writer.written == 0 and writer.pending == 0
    assert influxdb_session.http_requests(f"/write?db={db}") == [400, 400], "a refused batch is never resent"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "unable to parse" in errors[0], errors


async def test_the_v2_api_against_influxdb_1x_says_to_set_api_v1(tmp_path: Path, influxdb_session: InfluxDB) -> None:
    settings = TsdbSettings(url=influxdb_session.url, api="v2", org="o", bucket="b", spill_path=tmp_path / "spill")
    writer = TsdbWriter(settings)
    task = asyncio.create_task(writer.run())
    writer.add(points(0, 3, int(time.time() * 1000)))
    await wait_for_async(lambda: writer.blocked, 10, "the writer to report itself blocked")
    await writer.close()
    await task
    writer.dispose()
    assert writer.blocked is not None and 'InfluxDB 1.6.7~rc0, which has no /api/v2/write: set [influx] api = "v1"' in (
        writer.blocked
    )
    assert writer.pending == 3, "lines refused for the destination are kept for the next start"


async def test_wrong_credentials_are_blocked_with_the_fix_and_right_ones_write(
    tmp_path: Path, influxdb_factory: InfluxDBFactory
) -> None:
    server = influxdb_factory(auth=True)
    server.create_database("secure")
    base_ms = int(time.time() * 1000) - 60_000
    wrong = TsdbWriter(v1_settings(server, tmp_path / "a", "secure", username=server.admin_user, password="nope"))
    task = asyncio.create_task(wrong.run())
    wrong.add(points(0, 5, base_ms))
    await wait_for_async(lambda: wrong.blocked, 10, "the writer to report itself blocked")
    await wrong.close()
    await task
    wrong.dispose()
    assert wrong.blocked is not None and "HTTP 401" in wrong.blocked and "[influx] username/password" in wrong.blocked
    right = TsdbWriter(
        v1_settings(server, tmp_path / "a", "secure", username=server.admin_user, password=server.admin_password)
    )
    task = asyncio.create_task(right.run())
    assert await right.flush(deadline_s=10), "the lines the wrong password could not write were spilled, then sent"
    await right.close()
    await task
    right.dispose()
    assert values(server, "secure") == list(range(5))


async def test_the_spill_bound_holds_dropping_the_oldest_lines_counted(
    tmp_path: Path, influxdb_factory: InfluxDBFactory
) -> None:
    server = influxdb_factory(start=False)  # its port is chosen: nothing listens there yet
    settings = v1_settings(server, tmp_path, "bounded", buffer_max_lines=10, spill_max_bytes=8192)
    writer = TsdbWriter(settings)
    task = asyncio.create_task(writer.run())
    base_ms = int(time.time() * 1000) - 60_000
    for start in range(0, 2000, 100):
        writer.add(points(start, 100, base_ms))
    await wait_for_async(lambda: writer.failures, 10, "a failed write", until=lambda n: n > 0)
    spill_bytes = sum(p.stat().st_size for p in settings.spill_path.iterdir())
    assert 0 < spill_bytes <= 8192 and f"tsdb_spill_bytes={spill_bytes} " in writer.status()
    assert writer.dropped > 0 and writer.dropped + writer.pending == 2000
    assert f"tsdb_dropped={writer.dropped} " in writer.status()
    kept = writer.pending
    server.start()
    server.create_database("bounded")
    assert await writer.flush(deadline_s=20)
    await writer.close()
    await task
    writer.dispose()
    assert values(server, "bounded") == list(range(2000 - kept, 2000)), "the newest lines survive, in full"


async def test_a_refused_connection_is_retried_with_backoff(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    writer = TsdbWriter(TsdbSettings(url=url, api="v1", database="x", spill_path=tmp_path / "s", retry_max_s=0.2))
    task = asyncio.create_task(writer.run())
    writer.add(["m v=1i 1"])
    await wait_for_async(lambda: writer.failures, 10, "3 failed writes", until=lambda n: n >= 3)
    await writer.close()
    await task
    writer.dispose()
    assert writer.blocked is None and writer.pending == 1 and "tsdb_failures=" in writer.status()
