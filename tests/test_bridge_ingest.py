"""Ingestion through a real broker into a real SQLite registry: every type, dead letters, dedup."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiomqtt
import msgspec
import orjson
import pytest

from cloud_bridge.app import Bridge, running_bridge
from cloud_bridge.config import BridgeConfig, FleetConfig, IngestConfig, MqttConfig
from cloud_bridge.registry import (
    AlertRow,
    CommandAckRow,
    DeadLetter,
    Device,
    ResultRow,
    SampleRow,
    SeenMessage,
    TelemetryRow,
)
from devservers import Mosquitto
from schemas import Alert, Answer, Envelope, Result, Results, Sample, Status, Telemetry, encode, new_msg_id
from schemas.codec import to_builtins
from schemas.topics import Channel, Topics
from tests.factories import CHANNEL_OF, examples, topic_for

pytestmark = pytest.mark.timeout(60)

TOPICS = Topics("fleet")


def ingested_examples(device: str = "dev-1") -> list[Envelope]:
    return [m for m in examples("f1", device) if isinstance(m, (*CHANNEL_OF, Alert))]


def bridge_config(tmp_path: Path, broker: Mosquitto, shared: bool = True, **ingest: int) -> BridgeConfig:
    return BridgeConfig(
        state_dir=str(tmp_path / "state"),
        mqtt=MqttConfig(host=broker.host, port=broker.port, client_id="bridge-ingest"),
        fleet=FleetConfig(shared=shared, share_group="g1"),
        ingest=IngestConfig(**ingest),
    )


async def wait_handled(bridge: Bridge, n: int, limit_s: float = 10.0) -> None:
    """Wait until the bridge has stored, dropped or dead-lettered `n` messages."""
    assert bridge.ingestor is not None
    async with asyncio.timeout(limit_s):
        await bridge.ingestor.wait_for(lambda s: s.stored + s.duplicates + s.dead_letters >= n)


async def publish_all(broker: Mosquitto, items: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        for topic, payload in items:
            await client.publish(topic, payload, qos=1)


async def test_every_message_type_is_stored(tmp_path: Path, mosquitto: Mosquitto) -> None:
    messages = ingested_examples()
    assert len(messages) == 7
    result = next(m for m in messages if isinstance(m, Result))
    results = _results_of(messages)
    answers = 1 + len(results.answers)  # a result/1 carries one answer, a result/2 several
    async with running_bridge(bridge_config(tmp_path, mosquitto)) as bridge:
        await publish_all(mosquitto, [(topic_for(m), encode(m)) for m in messages])
        await wait_handled(bridge, len(messages))
        reg = bridge.registry
        counts = {t.__name__: await reg.count(t) for t in (TelemetryRow, SampleRow, ResultRow, CommandAckRow, AlertRow)}
        devices = await reg.rows(Device)
        samples = await reg.rows(SampleRow)
        result_rows = await reg.rows(ResultRow)
        telemetry_rows = await reg.rows(TelemetryRow)
        seen = await reg.count(SeenMessage)
    assert counts == {**dict.fromkeys(counts, 1), "ResultRow": answers}
    # The window's body as sent, but for its feature statistics: drift_windows keeps those.
    telemetry = next(m for m in messages if isinstance(m, Telemetry))
    expected = to_builtins(telemetry)
    assert expected.pop("features")["n"] > 0
    assert telemetry_rows[0]["body"] == expected
    assert seen == 7
    (device,) = devices
    sample = next(m for m in messages if isinstance(m, Sample))
    status = next(m for m in messages if isinstance(m, Status))
    assert device["online"] is True
    assert device["model_version"] == "1.0.0" and device["model_sha256"] == "ab" * 32
    assert device["messages"] == 7 and device["samples"] == 1 and device["results"] == answers
    assert device["telemetry_windows"] == 1
    assert device["last_seen"] >= status.ts
    (row,) = samples
    assert row["msg_id"] == sample.msg_id
    assert row["tensor"] == sample.input.data
    assert row["shape"] == [1, 64] and row["dtype"] == "float32"
    assert row["topk"][0] == {"label": "3", "index": 3, "prob": 0.55}
    assert row["truth"] == "8" and row["reasons"] == ["margin"]
    by_key = {(r["msg_id"], r["seq"]): r for r in result_rows}
    assert set(by_key) == {(result.msg_id, 0)} | {(results.msg_id, i) for i in range(len(results.answers))}
    assert _answer_of(by_key[result.msg_id, 0]) == _row_of(result, result)
    for i, answer in enumerate(results.answers):
        assert _answer_of(by_key[results.msg_id, i]) == _row_of(results, answer)


def _row_of(envelope: Result | Results, answer: Answer | Result) -> dict[str, object]:
    """The results row the registry should hold for one answer."""
    return {
        "fleet_id": envelope.fleet_id,
        "device_id": envelope.device_id,
        "inference_id": answer.inference_id,
        "model_version": envelope.model.version,
        "label": answer.label,
        "path": answer.path,
        "confidence": answer.confidence,
        "truth": answer.truth,
        "ts": envelope.ts,
    }


def _answer_of(row: dict[str, object]) -> dict[str, object]:
    """A stored results row without its key (msg_id, seq)."""
    return {k: v for k, v in row.items() if k not in ("msg_id", "seq")}


def _results_of(messages: list[Envelope]) -> Results:
    return next(m for m in messages if isinstance(m, Results))


def _batch(device: str, n: int) -> Results:
    """A result/2 of `n` answers, as an edge node sends for a micro-batch."""
    template = next(m for m in examples("f1", device) if isinstance(m, Results))
    answers = [
        msgspec.structs.replace(template.answers[i % 2], inference_id=f"{device}-{i}", confidence=i / n)
        for i in range(n)
    ]
    return msgspec.structs.replace(template, msg_id=new_msg_id(), answers=answers)


async def test_a_batch_of_answers_is_one_row_each_and_a_redelivered_copy_adds_none(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    n = 37
    batch = _batch("dev-b", n)
    item = (topic_for(batch), encode(batch))
    config = bridge_config(tmp_path, mosquitto)
    async with running_bridge(config) as bridge:
        await publish_all(mosquitto, [item])
        await wait_handled(bridge, 1)
        rows = await bridge.registry.rows(ResultRow)
        (device,) = await bridge.registry.rows(Device)
        assert (device["messages"], device["results"]) == (1, n)
        # A redelivery (QoS 1, or the device's outbox re-sending after a lost PUBACK): same msg_id.
        await publish_all(mosquitto, [item])
        await wait_handled(bridge, 2)
        assert bridge.ingestor is not None
        assert (bridge.ingestor.stats.stored, bridge.ingestor.stats.duplicates) == (1, 1)
        assert await bridge.registry.count(ResultRow) == n
        (device,) = await bridge.registry.rows(Device)
        assert (device["messages"], device["results"]) == (1, n)
    # Also after a restart, when only the registry remembers the msg_id.
    async with running_bridge(config) as bridge:
        await publish_all(mosquitto, [item])
        await wait_handled(bridge, 1)
        assert bridge.ingestor is not None and bridge.ingestor.stats.duplicates == 1
        assert await bridge.registry.count(ResultRow) == n
        (device,) = await bridge.registry.rows(Device)
        assert (device["messages"], device["results"]) == (1, n)
    # One row per answer, in the message's order, each keyed by the message and its place in it.
    rows.sort(key=lambda r: r["seq"])
    assert [(r["msg_id"], r["seq"]) for r in rows] == [(batch.msg_id, i) for i in range(n)]
    assert [r["inference_id"] for r in rows] == [a.inference_id for a in batch.answers]
    assert [_answer_of(r) for r in rows] == [_row_of(batch, a) for a in batch.answers]


async def test_invalid_payloads_are_dead_lettered_and_valid_ones_around_them_stored(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    good = ingested_examples()
    telemetry = next(m for m in good if isinstance(m, Telemetry))
    status = next(m for m in good if isinstance(m, Status))
    wrong_version = orjson.loads(encode(status))
    wrong_version["schema"] = "status/9"
    huge = encode(telemetry)[:-1] + b',"pad":"' + b"x" * (300 * 1024) + b'"}'
    bad = [
        (topic_for(status), b'{"schema": "status/1", "msg_id": '),
        (topic_for(status), orjson.dumps(wrong_version)),
        (TOPICS.device("f1", "someone-else", Channel.TELEMETRY), encode(telemetry)),
        (topic_for(telemetry), huge),
    ]
    items = [(topic_for(good[0]), encode(good[0]))]
    for (topic, payload), message in zip(bad, good[1:], strict=False):
        items += [(topic, payload), (topic_for(message), encode(message))]
    items += [(topic_for(m), encode(m)) for m in good[len(bad) + 1 :]]
    async with running_bridge(bridge_config(tmp_path, mosquitto, dead_letter_max_bytes=1000)) as bridge:
        await publish_all(mosquitto, items)
        await wait_handled(bridge, len(items))
        letters = await bridge.registry.rows(DeadLetter)
        stored = await bridge.registry.count(SeenMessage)
    assert stored == len(good)
    assert bridge.ingestor is not None and bridge.ingestor.stats.dead_letters == 4
    by_reason = sorted(letters, key=lambda r: r["id"])
    assert "malformed JSON" in by_reason[0]["reason"]
    assert by_reason[0]["raw"] == bad[0][1]
    assert by_reason[1]["field"] == "$.schema" and "status/9" in by_reason[1]["reason"]
    assert by_reason[2]["field"] == "$.device_id" and "someone-else" in by_reason[2]["reason"]
    assert by_reason[2]["topic"] == bad[2][0]
    assert "limit" in by_reason[3]["reason"]
    assert by_reason[3]["raw_size"] == len(huge) and len(by_reason[3]["raw"]) == 1000
    assert all(r["received_at"] > 0 for r in letters)


async def test_duplicate_msg_ids_are_dropped_also_after_a_restart(tmp_path: Path, mosquitto: Mosquitto) -> None:
    messages = ingested_examples()
    items = [(topic_for(m), encode(m)) for m in messages]
    config = bridge_config(tmp_path, mosquitto)
    async with running_bridge(config) as bridge:
        # Same messages twice in one run: the second copy hits the in-memory cache or the batch set.
        await publish_all(mosquitto, items + items)
        await wait_handled(bridge, 2 * len(items))
        assert bridge.ingestor is not None
        assert bridge.ingestor.stats.duplicates == len(items)
    # A new bridge process has an empty cache: the registry's unique msg_id still drops them.
    async with running_bridge(config) as bridge:
        await publish_all(mosquitto, items)
        await wait_handled(bridge, len(items))
        assert bridge.ingestor is not None
        assert bridge.ingestor.stats.duplicates == len(items)
        assert bridge.ingestor.stats.stored == 0
        assert await bridge.registry.count(TelemetryRow) == 1
        assert await bridge.registry.count(ResultRow) == 1 + len(_results_of(messages).answers)
        (device,) = await bridge.registry.rows(Device)
        assert device["messages"] == len(items)
        assert device["results"] == 1 + len(_results_of(messages).answers)
        # Ids older than the retention are forgotten; fresh ones are kept.
        assert await bridge.registry.prune_seen(time.time() - 3600) == 0
        assert await bridge.registry.prune_seen(time.time() + 1) == len(items)
        assert await bridge.registry.count(SeenMessage) == 0


async def test_messages_sent_while_bridge_is_down_arrive_via_persistent_session(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = bridge_config(tmp_path, mosquitto)
    async with running_bridge(config):
        pass
    # The bridge's session (clean_start False, expiry 1 h) keeps its shared subscription queued.
    messages = [m for d in ("a1", "a2", "a3") for m in ingested_examples(d)]
    await publish_all(mosquitto, [(topic_for(m), encode(m)) for m in messages])
    async with running_bridge(config) as bridge:
        await wait_handled(bridge, len(messages))
        assert await bridge.registry.count(SeenMessage) == len(messages)
        assert len(await bridge.registry.rows(Device)) == 3


@pytest.mark.parametrize("shared", [True, False])
async def test_broker_restart_mid_stream_loses_nothing(tmp_path: Path, mosquitto: Mosquitto, shared: bool) -> None:
    first = [m for d in ("r1", "r2") for m in ingested_examples(d)]
    second = [m for d in ("r3", "r4") for m in ingested_examples(d)]
    async with running_bridge(bridge_config(tmp_path, mosquitto, shared=shared)) as bridge:
        await publish_all(mosquitto, [(topic_for(m), encode(m)) for m in first])
        await wait_handled(bridge, len(first))
        await asyncio.to_thread(mosquitto.stop)
        await asyncio.to_thread(mosquitto.start)
        assert bridge.mqtt is not None and bridge.ingestor is not None
        if shared:
            # mosquitto 2.0.11 restores a persistent session after a restart but not its *shared*
            # subscriptions: until the bridge resubscribes, messages for it match nothing and are lost.
            async with asyncio.timeout(10):
                await bridge.mqtt.wait_subscribed(2)
        # Without shared subscriptions these are published while the bridge may still be
        # reconnecting: its persistent session queues them.
        await publish_all(mosquitto, [(topic_for(m), encode(m)) for m in second])
        # The broker may also redeliver some of the first batch (acked, but its persistence file was
        # older): those count as duplicates, so wait on what was stored.
        async with asyncio.timeout(20):
            await bridge.ingestor.wait_for(lambda s: s.stored >= len(first) + len(second))
        assert await bridge.registry.count(SeenMessage) == len(first) + len(second)
        assert bridge.mqtt is not None and bridge.mqtt.generation == 2


async def test_sample_with_inconsistent_tensor_is_dead_lettered(tmp_path: Path, mosquitto: Mosquitto) -> None:
    sample = next(m for m in ingested_examples() if isinstance(m, Sample))
    body = orjson.loads(encode(sample))
    body["input"]["shape"] = [1, 65]
    async with running_bridge(bridge_config(tmp_path, mosquitto)) as bridge:
        await publish_all(mosquitto, [(topic_for(sample), orjson.dumps(body))])
        await wait_handled(bridge, 1)
        (letter,) = await bridge.registry.rows(DeadLetter)
        assert await bridge.registry.count(SampleRow) == 0
    assert letter["field"] == "$.input.data" and "needs 260 bytes" in letter["reason"]
