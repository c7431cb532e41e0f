"""Device rows under two bridges sharing one registry (a SQLite file, and a private PostgreSQL server).
Their ingestors are fed directly (no broker), so the order in which the bridges commit is the test's
to choose.

Covers what the shared subscription makes possible: a telemetry window committed by one bridge after
the device's last will was recorded by the other must not flip the device back online, and a message
both bridges took (a redelivery to another session) is stored and counted once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from cloud_bridge.config import IngestConfig
from cloud_bridge.ingest.ingestor import Ingestor, IngestStats
from cloud_bridge.mqtt import Incoming
from cloud_bridge.registry import Device, Registry, SeenMessage, TelemetryRow
from schemas import Envelope, Status, Telemetry, encode, new_msg_id
from schemas.topics import Channel, Topics
from tests.factories import examples

pytestmark = pytest.mark.timeout(60)

TOPICS = Topics("fleet")
WAIT_S = 10.0


class Bridge:
    """One bridge's ingestion path (its own dedup cache and acks) on the shared registry."""

    def __init__(self, registry: Registry) -> None:
        self.acked: list[int] = []
        self.ingestor = Ingestor(TOPICS, registry, IngestConfig(), ack=self._ack)
        self._mids = itertools.count(1)

    def _ack(self, message: Incoming) -> bool:
        self.acked.append(message.mid)
        return True

    async def deliver(self, *messages: Envelope) -> IngestStats:
        """Submit `messages` as one delivery and wait until all of them are committed and acked."""
        want = len(self.acked) + len(messages)
        for message in messages:
            channel = Channel.STATUS if isinstance(message, Status) else Channel.TELEMETRY
            topic = TOPICS.device(message.fleet_id, message.device_id, channel)
            self.ingestor.submit(Incoming(topic, encode(message), 1, next(self._mids), 1, None, None))
        async with asyncio.timeout(WAIT_S):
            await self.ingestor.wait_for(lambda _: len(self.acked) >= want)
        return self.ingestor.stats


@pytest.fixture(params=["sqlite", "postgresql"])
async def bridges(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Bridge, Bridge, Registry]]:
    if request.param == "postgresql":
        url = str(request.getfixturevalue("postgres_url"))
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
    registry = Registry(url)
    await registry.create()
    one, two = Bridge(registry), Bridge(registry)
    async with asyncio.TaskGroup() as tg:
        for b in (one, two):
            tg.create_task(b.ingestor.run())
        try:
            yield one, two, registry
        finally:
            for b in (one, two):
                await b.ingestor.close()
    await registry.close()


def status(device: str, state: str, ts: float, connection: int | None = None) -> Status:
    (birth,) = (m for m in examples("f1", device) if isinstance(m, Status))
    reason = "connected" if state == "online" else "connection_lost"
    return msgspec.structs.replace(birth, msg_id=new_msg_id(), state=state, reason=reason, ts=ts, connection=connection)


def telemetry(device: str, ts: float) -> Telemetry:
    (window,) = (m for m in examples("f1", device) if isinstance(m, Telemetry))
    return msgspec.structs.replace(window, msg_id=new_msg_id(), ts=ts, window_start=ts - 10, window_end=ts)


async def device_row(registry: Registry, device: str) -> dict[str, object]:
    (row,) = [r for r in await registry.rows(Device) if r["device_id"] == device]
    return row


async def test_telemetry_committed_after_the_last_will_leaves_the_device_offline(
    bridges: tuple[Bridge, Bridge, Registry],
) -> None:
    one, two, registry = bridges
    now = time.time()
    await one.deliver(status("dev-1", "online", now - 60))
    # The window was sent before the link died, but the other bridge commits it after the will.
    await one.deliver(status("dev-1", "offline", now - 60))
    await two.deliver(telemetry("dev-1", now - 5))
    row = await device_row(registry, "dev-1")
    assert row["online"] is False
    assert row["telemetry_windows"] == 1 and row["last_seen"] == pytest.approx(now - 5)
    # The next birth brings it back.
    await two.deliver(status("dev-1", "online", now))
    assert (await device_row(registry, "dev-1"))["online"] is True


async def test_device_first_heard_through_telemetry_is_online(bridges: tuple[Bridge, Bridge, Registry]) -> None:
    one, _, registry = bridges
    await one.deliver(telemetry("dev-2", time.time()))
    assert (await device_row(registry, "dev-2"))["online"] is True


async def test_status_and_telemetry_in_one_batch_follow_the_status(bridges: tuple[Bridge, Bridge, Registry]) -> None:
    one, _, registry = bridges
    now = time.time()
    await one.deliver(status("dev-3", "online", now - 30))
    await one.deliver(status("dev-3", "offline", now - 30), telemetry("dev-3", now))
    assert (await device_row(registry, "dev-3"))["online"] is False


async def test_a_message_both_bridges_took_is_stored_and_counted_once(
    bridges: tuple[Bridge, Bridge, Registry],
) -> None:
    one, two, registry = bridges
    now = time.time()
    shared = telemetry("dev-4", now - 10)
    await one.deliver(shared)
    # The other bridge's cache has never seen it: only the registry's unique msg_id can drop it,
    # inside the same transaction, together with its device counters and its drift/TSDB output.
    stats = await two.deliver(shared, telemetry("dev-4", now))
    assert (stats.stored, stats.duplicates) == (1, 1)
    row = await device_row(registry, "dev-4")
    assert row["messages"] == 2 and row["telemetry_windows"] == 2
    assert await registry.count(TelemetryRow) == 2
    assert await registry.count(SeenMessage) == 2


async def test_status_committed_out_of_order_follows_the_connection_order(
    bridges: tuple[Bridge, Bridge, Registry],
) -> None:
    """Each bridge commits the status copies it deduplicated first, in any order: the device row
    follows the status of the latest connection, and within one connection the will after the
    birth. (A will's ts is when it was prepared, at CONNECT: ts cannot order them.)"""
    one, two, registry = bridges
    now = time.time()
    await one.deliver(status("dev-5", "online", now, connection=7))
    await two.deliver(status("dev-5", "offline", now - 20, connection=6))  # connection 6's will, late
    row = await device_row(registry, "dev-5")
    assert row["online"] is True and row["status_order"] == 14
    await two.deliver(status("dev-5", "offline", now, connection=7))  # connection 7 ends
    await one.deliver(status("dev-5", "online", now + 1, connection=7))  # a status of 7 committed after its will
    row = await device_row(registry, "dev-5")
    assert row["online"] is False and row["status_order"] == 15
    await one.deliver(status("dev-5", "online", now + 2, connection=8))  # the next connection
    assert (await device_row(registry, "dev-5"))["online"] is True
    # In one batch, out of order, too.
    await two.deliver(
        status("dev-5", "offline", now + 3, connection=9), status("dev-5", "online", now + 3, connection=9)
    )
    row = await device_row(registry, "dev-5")
    assert row["online"] is False and row["status_order"] == 19
    # A device on older software (no connection number) is taken as it comes, as before.
    await one.deliver(status("dev-5", "online", now + 4))
    assert (await device_row(registry, "dev-5"))["online"] is True
