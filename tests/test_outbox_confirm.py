"""Confirmed delivery in the outbox, on real SQLite files: a row with a seq leaves on the cloud's
confirmation, not on the broker's PUBACK; overdue rows are sent again; the window holds back new
rows; eviction takes sent rows first; a restart sends unconfirmed rows again; seqs keep growing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge_node.uplink.outbox import Outbox, OutMessage, Priority, Stored
from edge_node.uplink.outbox.sent import Confirming

WAIT = 10.0


def msg(ob: Outbox, i: int, prio: Priority = Priority.RESULTS, size: int = 10, confirmed: bool = True) -> OutMessage:
    payload = str(i).encode().ljust(size, b".")
    seq = ob.next_seq() if confirmed else None
    return OutMessage(topic="t", payload=payload, priority=prio, msg_id=f"m{i}", seq=seq)


async def take(ob: Outbox, limit: int = 100) -> list[Stored]:
    return await asyncio.wait_for(ob.take(limit, wait=False), WAIT)


def ranges(rows: list[Stored]) -> list[tuple[int, int]]:
    return [(r.msg.seq, r.msg.seq) for r in rows if r.msg.seq is not None]


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    ob = await Outbox.open(tmp_path / "ob.db", 1_000_000, confirming=Confirming(window=100, timeout_s=30.0))
    yield ob
    await ob.close()


async def test_a_puback_keeps_the_row_until_the_cloud_confirms_it(outbox: Outbox) -> None:
    await outbox.put_many([msg(outbox, i) for i in range(5)])
    rows = await take(outbox)
    outbox.ack(r.row_id for r in rows)
    assert outbox.depth == 5 and outbox.delivery.unconfirmed == 5 and outbox.inflight == 0
    assert await take(outbox) == []  # sent rows are not handed out again before their timeout
    assert outbox.confirm(outbox.epoch, ranges(rows[:3])) == 3
    assert outbox.depth == 2 and outbox.delivery.confirmed == 3
    assert outbox.confirm(outbox.epoch, [(min(r[0] for r in ranges(rows)), 10**9)]) == 2
    assert outbox.depth == 0 and outbox.bytes == 0


async def test_a_confirmation_for_another_outbox_is_ignored(outbox: Outbox) -> None:
    await outbox.put(msg(outbox, 1))
    rows = await take(outbox)
    outbox.ack([rows[0].row_id])
    assert outbox.confirm("0123abcd", ranges(rows)) == 0
    assert outbox.depth == 1


async def test_rows_without_seq_and_broker_mode_leave_on_puback(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "a.db", 1_000_000, confirming=Confirming())
    await ob.put_many([msg(ob, 1, confirmed=False), msg(ob, 2)])
    rows = await take(ob)
    ob.ack(r.row_id for r in rows)
    assert ob.depth == 1 and ob.delivery.unconfirmed == 1  # only the row with a seq waits
    await ob.close()
    broker = await Outbox.open(tmp_path / "b.db", 1_000_000)
    await broker.put(msg(broker, 3))
    broker.ack(r.row_id for r in await take(broker))
    assert broker.depth == 0 and broker.delivery.mode == "broker"
    await broker.close()


async def test_an_overdue_row_is_sent_again_and_its_timeout_doubles(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "ob.db", 1_000_000, confirming=Confirming(timeout_s=0.2, timeout_max_s=10))
    await ob.put(msg(ob, 1))
    first = await take(ob)
    ob.ack([first[0].row_id])
    start = time.monotonic()
    again: list[Stored] = []
    while not again and time.monotonic() - start < WAIT:
        again = await take(ob)
        await asyncio.sleep(0.02)
    assert [r.msg.msg_id for r in again] == ["m1"] and time.monotonic() - start >= 0.2
    assert ob.delivery.resent == 1
    ob.ack([again[0].row_id])
    await asyncio.sleep(0.25)
    assert await take(ob) == []  # the second wait is 0.4 s
    await asyncio.sleep(0.25)
    assert [r.msg.msg_id for r in await take(ob)] == ["m1"]
    await ob.close()


async def test_a_confirmation_reaches_a_copy_in_flight(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "ob.db", 1_000_000, confirming=Confirming(timeout_s=0.05))
    await ob.put(msg(ob, 1))
    rows = await take(ob)
    ob.ack([rows[0].row_id])
    await asyncio.sleep(0.1)
    copy = await take(ob)  # sent again, in flight
    assert ob.confirm(ob.epoch, ranges(rows)) == 1 and ob.depth == 0
    ob.ack([copy[0].row_id])  # its late PUBACK changes nothing
    assert ob.depth == 0 and ob.bytes == 0
    await ob.close()


async def test_the_window_holds_back_new_rows_but_not_control(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "ob.db", 1_000_000, confirming=Confirming(window=3, timeout_s=30))
    await ob.put_many([msg(ob, i) for i in range(5)])
    sent = await take(ob, limit=3)
    ob.ack(r.row_id for r in sent)
    assert await take(ob) == []  # three await confirmation: nothing new goes out
    await ob.put(msg(ob, 9, Priority.CONTROL))
    control = await take(ob)
    assert [r.msg.msg_id for r in control] == ["m9"]
    ob.ack([control[0].row_id])
    ob.confirm(ob.epoch, ranges(sent[:1]) + ranges(control))
    assert [r.msg.msg_id for r in await take(ob)] == ["m3"]  # room for one: two of three await confirmation
    await ob.close()


async def test_eviction_takes_sent_rows_of_a_class_before_pending_ones(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "ob.db", 230, confirming=Confirming(timeout_s=30))
    await ob.put_many([msg(ob, i, size=50) for i in range(3)])  # 3 x (1 + 50) bytes
    sent = await take(ob, limit=2)
    ob.ack(r.row_id for r in sent)  # m0, m1 sent; m2 pending
    await ob.put(msg(ob, 3, size=150))  # needs 151 B, 77 of 230 are free: two rows must go
    assert ob.evicted == {**dict.fromkeys(Priority, 0), Priority.RESULTS: 2}
    assert ob.delivery.unconfirmed == 0  # the two sent rows went, m2 (never sent) stayed
    assert sorted(r.msg.msg_id for r in await take(ob)) == ["m2", "m3"]
    await ob.close()


async def test_a_restart_sends_unconfirmed_rows_again_and_seqs_keep_growing(tmp_path: Path) -> None:
    path = tmp_path / "ob.db"
    ob = await Outbox.open(path, 1_000_000, confirming=Confirming())
    await ob.put_many([msg(ob, i) for i in range(3)])
    rows = await take(ob)
    ob.ack(r.row_id for r in rows)
    ob.confirm(ob.epoch, ranges(rows[:1]))
    epoch, highest = ob.epoch, max(r.msg.seq or 0 for r in rows)
    await ob.close()
    again = await Outbox.open(path, 1_000_000, confirming=Confirming())
    assert again.epoch == epoch
    assert [r.msg.msg_id for r in await take(again)] == ["m1", "m2"]  # sent, never confirmed
    assert again.next_seq() > highest
    await again.close()
    (tmp_path / "new").mkdir()
    fresh = await Outbox.open(tmp_path / "new" / "ob.db", 1_000_000, confirming=Confirming())
    assert fresh.epoch != epoch  # another file: confirmations meant for the old one do not apply
    await fresh.close()
