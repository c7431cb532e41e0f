"""Ingestion pipelined with its commits, result rows as tuples, the per-device TSDB tags and escalation
slots freed before the replies' PUBACKs: what changed to make one bridge keep up better at 10,000
devices (docs/scaling.md)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.exc import IntegrityError

from cloud_bridge.app import Bridge
from cloud_bridge.config import BridgeConfig, EscalationConfig, IngestConfig
from cloud_bridge.escalation.escalator import CloudModel, Escalator
from cloud_bridge.ingest.ingestor import Ingestor
from cloud_bridge.mqtt import Incoming
from cloud_bridge.registry import Agreement, Batch, Registry, ResultRow, SeenMessage, TelemetryRow
from cloud_bridge.tsdb.lines import device_tags, line, status_line
from demokit.dataset import DigitsSplit
from demokit.models import DemoModel
from schemas import EscalationRequest, ModelRef, Results, Telemetry, TopK, encode, encode_tensor, new_msg_id
from schemas.topics import Channel, Topics
from tests.factories import examples, topic_for

pytestmark = pytest.mark.timeout(60)

TOPICS = Topics("fleet")


def _incoming(message: Results | Telemetry, mid: int) -> Incoming:
    return Incoming(topic_for(message), encode(message), 1, mid, 1, None, None)


def _messages(devices: int) -> list[Results | Telemetry]:
    out: list[Results | Telemetry] = []
    for i in range(devices):
        out += [m for m in examples("f1", f"dev-{i}") if isinstance(m, (Results, Telemetry))]
    return out


async def test_batches_planned_while_others_commit_are_stored_once_and_acked_in_order(tmp_path: Path) -> None:
    """batch_max 1: every message is its own batch, each planned while the previous one commits; a
    redelivered copy planned before its original committed is still stored once (the unique msg_id)."""
    registry = Registry(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    await registry.create()
    acked: list[int] = []
    ingestor = Ingestor(TOPICS, registry, IngestConfig(batch_max=1), lambda m: acked.append(m.mid) is None)
    messages = _messages(5)
    incoming = [_incoming(m, i) for i, m in enumerate(messages)]
    copies = [_incoming(m, 1000 + i) for i, m in enumerate(messages)]
    task = asyncio.create_task(ingestor.run())
    try:
        for original, copy in zip(incoming, copies, strict=True):
            ingestor.submit(original)
            ingestor.submit(copy)  # the redelivery right behind it, in the next batch
        async with asyncio.timeout(30):
            await ingestor.wait_for(lambda s: s.stored + s.duplicates >= 2 * len(messages))
        results = sum(len(m.answers) for m in messages if isinstance(m, Results))
        assert await registry.count(SeenMessage) == len(messages)
        assert await registry.count(ResultRow) == results
        assert await registry.count(TelemetryRow) == sum(isinstance(m, Telemetry) for m in messages)
        assert ingestor.stats.stored == len(messages)
        assert ingestor.stats.duplicates == len(messages)
        expected = [mid for pair in zip(incoming, copies, strict=True) for mid in (pair[0].mid, pair[1].mid)]
        assert acked == expected  # committed and acknowledged in arrival order
        assert ingestor.stats.batches == 2 * len(messages)
    finally:
        await ingestor.close()
        await task
        await registry.close()


async def test_a_failing_batch_raises_and_writes_nothing(tmp_path: Path) -> None:
    registry = Registry(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    await registry.create()
    try:
        good = Batch(seen=[{"msg_id": "m-1", "received_at": 1.0}])
        await registry.commit_batch(good)
        # A hook that inserts a msg_id already stored (a plain INSERT, no ON CONFLICT): the batch fails
        # after its first statement wrote, and the whole batch rolls back.
        bad = Batch(seen=[{"msg_id": "m-2", "received_at": 2.0}])
        again = [{"msg_id": "m-1", "received_at": 3.0}]
        bad.hooks.append(lambda conn: conn.execute(SeenMessage.__table__.insert(), again))
        with pytest.raises(IntegrityError):
            await registry.commit_batch(bad)
        assert {r["msg_id"] for r in await registry.rows(SeenMessage)} == {"m-1"}
    finally:
        await registry.close()


def test_device_tags_are_those_line_formats() -> None:
    assert device_tags("f 1", "d,1", "m=x", "") == ",device=d\\,1,fleet=f\\ 1,model=m\\=x"
    tags = {"fleet": "f1", "device": "d1", "model": "", "version": "2"}
    assert status_line("f1", "d1", True, 12.3456, "", "2") == line("device_status", tags, {"online": 1}, 12346)
    assert status_line("f1", "d1", False, 1.0) == line("device_status", tags | {"version": ""}, {"online": 0}, 1000)


async def test_an_escalation_batch_frees_its_model_slot_before_its_replies_are_acknowledged(
    demo_models: dict[str, DemoModel], digits: DigitsSplit
) -> None:
    """One model slot, the first reply's PUBACK held back: the second request is still answered by the
    model (its reply published) while the first reply waits."""
    model = CloudModel(demo_models["cloud"].path)
    published: list[str] = []
    first_acked, second_published = asyncio.Event(), asyncio.Event()

    async def publish(topic: str, payload: bytes, qos: int, correlation: bytes | None) -> None:
        published.append(topic)
        if len(published) == 2:
            second_published.set()
        if len(published) == 1:
            await first_acked.wait()  # the broker's PUBACK of the first reply, held back

    config = EscalationConfig(max_concurrency=1, max_batch=1)
    escalator = Escalator(TOPICS, model, config, publish, lambda _m: True)
    task = asyncio.create_task(escalator.run())
    deadline = time.time() + 30
    for i, device in enumerate(("dev-a", "dev-b")):
        req = _escalation(device, digits.X_test[i], deadline)
        escalator.submit(Incoming(TOPICS.device("f1", device, Channel.ESCALATE), encode(req), 1, i, 1, None, None))
    try:
        async with asyncio.timeout(20):
            await second_published.wait()
        assert published == [TOPICS.device("f1", d, Channel.ESCALATE_REPLY) for d in ("dev-a", "dev-b")]
        assert escalator.stats.answered == 1  # dev-b's; dev-a's reply is still waiting for its PUBACK
    finally:
        first_acked.set()
        await escalator.close()
        await task
    assert escalator.stats.answered == 2


def _escalation(device: str, x: np.ndarray, deadline: float) -> EscalationRequest:
    return EscalationRequest(
        msg_id=new_msg_id(),
        fleet_id="f1",
        device_id=device,
        ts=time.time(),
        request_id=f"{device}-1",
        model=ModelRef(name="digits-edge", version="1.0.0", sha256="ab" * 32),
        input=encode_tensor(x.reshape(1, -1).astype(np.float32)),
        edge_topk=[TopK(label="3", index=3, prob=0.5)],
        deadline=deadline,
        reply_to=TOPICS.device("f1", device, Channel.ESCALATE_REPLY),
    )


async def test_agreement_counts_survive_a_locked_registry(tmp_path: Path, demo_models: dict[str, DemoModel]) -> None:
    """Another writer holds SQLite's lock past the busy timeout (an ingest batch on a starved machine):
    the flush fails without stopping the bridge, and the counts go with the next flush."""
    config = BridgeConfig(state_dir=tmp_path / "state")
    db = (tmp_path / "state" / "registry.db").resolve()
    bridge = Bridge(config)
    await bridge.registry.create()

    async def publish(topic: str, payload: bytes, qos: int, correlation: bytes | None) -> None:
        return None

    model = CloudModel(demo_models["cloud"].path)
    bridge.escalator = Escalator(TOPICS, model, EscalationConfig(), publish, lambda _m: True)
    bridge.escalator.agreement.counts[("f1", "dev-1", "1.0.0")] = [3, 2]
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
        await bridge.flush_agreement()  # waits out the busy timeout, then gives up
        assert bridge.escalator.agreement.counts == {("f1", "dev-1", "1.0.0"): [3, 2]}
        blocker.execute("ROLLBACK")
        await bridge.flush_agreement()
        assert bridge.escalator.agreement.counts == {}
        (row,) = await bridge.registry.rows(Agreement)
        assert (row["answered"], row["agreed"]) == (3, 2)
    finally:
        blocker.close()
        await bridge.registry.close()
