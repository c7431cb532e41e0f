"""The durable outbox over real SQLite files: order, durability, in-flight, eviction, expiry, errors."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from edge_node.errors import OutboxClosedError, OutboxCorruptError, OutboxFullError, OutboxUnavailableError
from edge_node.uplink.outbox import Outbox, OutMessage, Priority, Stored
from tests.processes import running

WAIT = 10.0


def msg(i: int | str, prio: Priority = Priority.RESULTS, size: int = 10, **kw: object) -> OutMessage:
    payload = str(i).encode().ljust(size, b".")
    return OutMessage(topic="t", payload=payload, priority=prio, msg_id=f"m{i}", **kw)  # type: ignore[arg-type]


async def take_all(ob: Outbox, limit: int = 1000) -> list[Stored]:
    """Everything pending right now (take blocks when nothing is, so bound it)."""
    out: list[Stored] = []
    while ob.depth - ob.inflight > 0:
        out.extend(await asyncio.wait_for(ob.take(limit), WAIT))
    return out


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    ob = await Outbox.open(tmp_path / "ob.db", 1_000_000)
    yield ob
    await ob.close()


async def test_take_orders_by_priority_then_age(outbox: Outbox) -> None:
    order = [Priority.SAMPLES, Priority.CONTROL, Priority.RESULTS, Priority.CONTROL, Priority.ESCALATION]
    for i, prio in enumerate(order):
        await outbox.put(msg(i, prio))
    await outbox.put_many([msg(10, Priority.TELEMETRY), msg(11, Priority.SAMPLES)])
    rows = await asyncio.wait_for(outbox.take(100), WAIT)
    assert [r.msg.msg_id for r in rows] == ["m1", "m3", "m4", "m10", "m2", "m0", "m11"]
    assert outbox.inflight == 7 and outbox.depth == 7


async def test_take_respects_limit_and_wakes_on_put(outbox: Outbox) -> None:
    waiter = asyncio.create_task(outbox.take(2))
    await asyncio.sleep(0)  # let the taker block on the empty outbox
    assert not waiter.done()
    await outbox.put_many([msg(1), msg(2), msg(3)])
    rows = await asyncio.wait_for(waiter, WAIT)
    assert [r.msg.msg_id for r in rows] == ["m1", "m2"]


async def test_every_field_survives_reopen(tmp_path: Path) -> None:
    full = OutMessage(
        topic="edge/dev1/esc",
        payload=bytes(range(256)),
        priority=Priority.ESCALATION,
        msg_id="abc",
        qos=1,
        retain=True,
        expires_at=time.time() + 3600,
        user_properties=(("k", "v"), ("k", "v2")),
        response_topic="edge/dev1/esc/reply",
        correlation_data=b"\x00\x01",
        content_type="application/json",
    )
    ob = await Outbox.open(tmp_path / "ob.db", 1_000_000)
    await ob.put(full)
    await ob.put(msg(2, Priority.CONTROL))
    await ob.close()
    ob2 = await Outbox.open(tmp_path / "ob.db", 1_000_000)
    try:
        rows = await take_all(ob2)
        assert [r.msg for r in rows] == [msg(2, Priority.CONTROL), full]
        assert ob2.bytes == len("edge/dev1/esc") + 256 + len("t") + 10
    finally:
        await ob2.close()


async def test_acked_rows_are_gone_and_unacked_come_back_in_order_after_reopen(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "ob.db", 1_000_000)
    await ob.put_many([msg(i, Priority(i % 5)) for i in range(20)])
    first = await asyncio.wait_for(ob.take(8), WAIT)
    ob.ack([r.row_id for r in first[::2]])  # half acked, half left in flight at close
    await ob.close()
    ob2 = await Outbox.open(tmp_path / "ob.db", 1_000_000)
    try:
        acked = {r.msg.msg_id for r in first[::2]}
        rows = await take_all(ob2)
        expected = sorted((i for i in range(20) if f"m{i}" not in acked), key=lambda i: (i % 5, i))
        assert [r.msg.msg_id for r in rows] == [f"m{i}" for i in expected]
        assert ob2.depth == 16
    finally:
        await ob2.close()


async def test_inflight_rows_are_not_handed_out_again_until_released(outbox: Outbox) -> None:
    await outbox.put_many([msg(i) for i in range(3)])
    first = await asyncio.wait_for(outbox.take(2), WAIT)
    second = await asyncio.wait_for(outbox.take(10), WAIT)
    assert [r.msg.msg_id for r in first] == ["m0", "m1"]
    assert [r.msg.msg_id for r in second] == ["m2"]
    blocked = asyncio.create_task(outbox.take(10))
    done, _ = await asyncio.wait({blocked}, timeout=0.2)
    assert not done, "in-flight rows were handed out twice"
    outbox.ack([first[1].row_id])
    assert outbox.release_inflight() == 2
    again = await asyncio.wait_for(blocked, WAIT)
    assert [r.msg.msg_id for r in again] == ["m0", "m2"]  # age order restored, acked row gone


async def test_eviction_takes_lowest_priority_oldest_first_and_counts(tmp_path: Path) -> None:
    # 10 rows of 11 B (topic "t" + 10 B payload) fill 110 B exactly.
    ob = await Outbox.open(tmp_path / "ob.db", 110)
    try:
        await ob.put_many([msg(i, Priority.SAMPLES) for i in range(3)])
        await ob.put_many([msg(i, Priority.RESULTS) for i in range(3, 6)])
        await ob.put_many([msg(i, Priority.CONTROL) for i in range(6, 10)])
        assert ob.bytes == 110
        await ob.put(msg(10, Priority.TELEMETRY, size=20))  # needs 21 B: two oldest SAMPLES go
        assert ob.evicted[Priority.SAMPLES] == 2 and sum(ob.evicted.values()) == 2
        await ob.put(msg(11, Priority.RESULTS, size=20))  # last SAMPLE + oldest RESULTS
        assert ob.evicted == {**dict.fromkeys(Priority, 0), Priority.SAMPLES: 3, Priority.RESULTS: 1}
        ids = [r.msg.msg_id for r in await take_all(ob)]
        assert ids == ["m6", "m7", "m8", "m9", "m10", "m4", "m5", "m11"]
        assert ob.bytes <= 110
    finally:
        await ob.close()


async def test_eviction_never_touches_higher_priority_inflight_or_control(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "ob.db", 55)
    try:
        await ob.put_many([msg(i, Priority.SAMPLES) for i in range(2)])
        await ob.put_many([msg(i, Priority.CONTROL) for i in range(2, 5)])
        inflight = await asyncio.wait_for(ob.take(4), WAIT)  # 3 CONTROL + oldest SAMPLE in flight
        assert [r.msg.msg_id for r in inflight] == ["m2", "m3", "m4", "m0"]
        # A CONTROL message may only evict the one pending SAMPLE (m1): 11 B is not enough for 20 B.
        with pytest.raises(OutboxFullError, match="CONTROL"):
            await ob.put(msg(5, Priority.CONTROL, size=20))
        assert ob.rejected[Priority.CONTROL] == 1 and sum(ob.evicted.values()) == 0
        ob.ack([inflight[3].row_id])  # the in-flight SAMPLE is acked: 11 B free
        await ob.put(msg(6, Priority.CONTROL, size=10))  # fits without evicting
        assert sum(ob.evicted.values()) == 0
        # Full of CONTROL + one SAMPLE: a SAMPLE may evict the older SAMPLE...
        await ob.put(msg(7, Priority.SAMPLES))
        assert ob.evicted[Priority.SAMPLES] == 1
        # ...and a RESULTS message may evict that SAMPLE; a SAMPLE may not evict a RESULTS row.
        await ob.put(msg(8, Priority.RESULTS))
        with pytest.raises(OutboxFullError, match="SAMPLES"):
            await ob.put(msg(9, Priority.SAMPLES))
        assert ob.evicted[Priority.SAMPLES] == 2 and ob.rejected[Priority.SAMPLES] == 1
        ob.release_inflight()
        ids = [r.msg.msg_id for r in await take_all(ob)]
        assert ids == ["m2", "m3", "m4", "m6", "m8"]
    finally:
        await ob.close()


async def test_counters_persist_across_reopen(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "ob.db", 22)
    await ob.put_many([msg(i, Priority.SAMPLES) for i in range(3)])  # third evicts the first
    await ob.put(msg(3, Priority.TELEMETRY, expires_at=time.time() - 1))  # evicts m1, expires on take
    with pytest.raises(OutboxFullError):
        await ob.put(msg(4, Priority.CONTROL, size=30))
    assert [r.msg.msg_id for r in await take_all(ob)] == ["m2"]  # m3 expired on the way
    await ob.close()
    ob2 = await Outbox.open(tmp_path / "ob.db", 22)
    try:
        assert ob2.evicted[Priority.SAMPLES] == 2
        assert ob2.expired[Priority.TELEMETRY] == 1
        assert ob2.rejected[Priority.CONTROL] == 1
    finally:
        await ob2.close()


async def test_expired_rows_are_dropped_not_sent_and_counted(outbox: Outbox) -> None:
    now = time.time()
    await outbox.put(msg("esc-late", Priority.ESCALATION, expires_at=now - 0.001))
    await outbox.put(msg("esc-ok", Priority.ESCALATION, expires_at=now + 3600))
    await outbox.put(msg("res", Priority.RESULTS))
    rows = await asyncio.wait_for(outbox.take(10), WAIT)
    assert [r.msg.msg_id for r in rows] == ["mesc-ok", "mres"]
    assert outbox.expired[Priority.ESCALATION] == 1 and outbox.depth == 2
    await outbox.put(msg("soon", Priority.ESCALATION, expires_at=now + 5))
    assert outbox.drop_expired(now + 1) == 0
    assert outbox.drop_expired(now + 6) == 1
    assert outbox.expired[Priority.ESCALATION] == 2
    assert outbox.depth == 2  # in-flight rows are not dropped by drop_expired


async def test_expired_rows_are_dropped_on_reopen(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "ob.db", 1000)
    await ob.put(msg(1, Priority.ESCALATION, expires_at=time.time() + 0.05))
    await ob.put(msg(2, Priority.RESULTS))
    await ob.close()
    await asyncio.sleep(0.06)  # the deadline itself is what is under test
    ob2 = await Outbox.open(tmp_path / "ob.db", 1000)
    try:
        assert ob2.expired[Priority.ESCALATION] == 1
        assert [r.msg.msg_id for r in await take_all(ob2)] == ["m2"]
    finally:
        await ob2.close()


async def test_closed_outbox_refuses_and_wakes_takers(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "ob.db", 1000)
    taker = asyncio.create_task(ob.take(1))
    await asyncio.sleep(0)
    await ob.close()
    with pytest.raises(OutboxClosedError):
        await asyncio.wait_for(taker, WAIT)
    with pytest.raises(OutboxClosedError):
        await ob.put(msg(1))


_CHILD = """
import asyncio, sys
from edge_node.uplink.outbox import Outbox, OutMessage, Priority

async def main() -> None:
    ob = await Outbox.open(sys.argv[1], 10**9, synchronous=sys.argv[2])
    async def producer(k: int) -> None:
        i = 0
        while True:
            mid = f"p{k}-{i}"
            await ob.put(OutMessage("t", mid.encode(), Priority(k % 5), mid))
            sys.stdout.write(mid + "\\n")
            sys.stdout.flush()
            i += 1
    await asyncio.gather(*(producer(k) for k in range(8)))

asyncio.run(main())
"""


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_kill_9_loses_no_accepted_put(tmp_path: Path, synchronous: str) -> None:
    db = tmp_path / "ob.db"
    # Not asyncio's subprocess: its child watcher sometimes loses a SIGKILLed child. Read from a thread.
    argv = [sys.executable, "-c", _CHILD, str(db), synchronous]
    reported: list[str] = []
    with running("outbox-child", argv, tmp_path / "child.log", stdout_pipe=True) as proc:
        assert proc.popen is not None and proc.popen.stdout is not None
        stdout = proc.popen.stdout
        while len(reported) < 3000:
            line = await asyncio.wait_for(asyncio.to_thread(stdout.readline), WAIT)
            assert line, f"child exited early rc={proc.returncode}\n{proc.log_tail()}"
            reported.append(line.decode().strip())
        returncode = proc.kill()
        rest = await asyncio.wait_for(asyncio.to_thread(stdout.read), WAIT)
    reported += [x for x in rest.decode().split("\n") if x.strip()]
    assert returncode == -signal.SIGKILL
    ob = await Outbox.open(db, 10**9)
    try:
        stored = [r.msg.msg_id for r in await take_all(ob)]
    finally:
        await ob.close()
    missing = set(reported) - set(stored)
    assert not missing, f"{len(missing)} accepted puts lost, e.g. {sorted(missing)[:5]}"
    # Replay order: by priority, and each producer's messages (one class each) in put order.
    prios = [int(m.split("-")[0][1:]) % 5 for m in stored]
    assert prios == sorted(prios)
    for k in range(8):
        seq = [int(m.split("-")[1]) for m in stored if m.startswith(f"p{k}-")]
        assert seq == sorted(seq)


async def test_unwritable_parent_gives_clear_unavailable_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(OutboxUnavailableError) as exc:
        await Outbox.open(blocker / "sub" / "ob.db", 1000)
    assert str(blocker) in str(exc.value) and "fix:" in str(exc.value)


async def test_corrupt_file_gives_corrupt_error(tmp_path: Path) -> None:
    db = tmp_path / "ob.db"
    db.write_bytes(b"this is not an sqlite file at all" * 200)
    with pytest.raises(OutboxCorruptError, match="move the file aside"):
        await Outbox.open(db, 1000)


def _mount_tmpfs(where: Path, options: str) -> bool:
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    where.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, timeout=10
    )
    return result.returncode == 0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A mount point whose tmpfs options the test chooses; unmounted afterwards."""
    where = tmp_path / "mnt"
    mounted: list[str] = []
    yield where, mounted
    if mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10, check=False)


async def test_read_only_mount_gives_clear_unavailable_error(tmpfs: tuple[Path, list[str]]) -> None:
    where, mounted = tmpfs
    if not _mount_tmpfs(where, "ro,size=1m"):
        pytest.skip("needs root with CAP_SYS_ADMIN to mount a read-only tmpfs")
    mounted.append("ro")
    with pytest.raises(OutboxUnavailableError) as exc:
        await Outbox.open(where / "ob.db", 1000)
    text = str(exc.value)
    assert str(where / "ob.db") in text and "mounted read-only" in text and "fix:" in text


async def test_disk_full_fails_the_put_then_recovers(tmpfs: tuple[Path, list[str]]) -> None:
    where, mounted = tmpfs
    if not _mount_tmpfs(where, "size=1m"):
        pytest.skip("needs root with CAP_SYS_ADMIN to mount a small tmpfs")
    mounted.append("rw")
    ob = await Outbox.open(where / "ob.db", 10**9)
    ballast = where / "ballast"
    try:
        with ballast.open("wb", buffering=0) as f, pytest.raises(OSError):
            for _ in range(1024):  # fill the filesystem: 1 MiB in 1 KiB writes at most
                f.write(b"\0" * 1024)
        accepted = 0
        with pytest.raises(OutboxUnavailableError, match="disk is full"):
            for i in range(1000):
                await ob.put(msg(i, size=1024))
                accepted += 1
        assert not ob.available
        assert ob.depth == accepted  # the failed row is not counted
        ballast.unlink()
        await ob.put(msg("after"))
        assert ob.available
        rows = await take_all(ob)
        assert [r.msg.msg_id for r in rows] == [f"m{i}" for i in range(accepted)] + ["mafter"]
    finally:
        await ob.close()


# ---- paging: the queue lives in the file, memory holds a bounded page per class ----------------


def _expected_order(ids: list[int]) -> list[str]:
    """Replay order of msg(i, Priority(i % 5)): by class, then put order."""
    return [f"m{i}" for i in sorted(ids, key=lambda i: (i % 5, i))]


async def test_memory_bookkeeping_is_bounded_by_the_page_not_the_depth(tmp_path: Path) -> None:
    page = 16
    bound = len(Priority) * 2 * page  # a page per class, plus one read ahead at its low-water mark
    ob = await Outbox.open(tmp_path / "ob.db", 10**9, page_rows=page)
    n = 3000
    try:
        for first in range(0, n, 250):
            await ob.put_many([msg(i, Priority(i % 5)) for i in range(first, first + 250)])
            assert ob.indexed_rows <= bound, "index entries grow with the depth"
        assert ob.depth == n and ob.bytes == n * 11
        got: list[str] = []
        acked: set[str] = set()
        for _ in range(60):  # takes of up to 37 rows cross many page boundaries of every class
            rows = await asyncio.wait_for(ob.take(37), WAIT)
            assert ob.indexed_rows - ob.inflight <= bound
            got += [r.msg.msg_id for r in rows]
            ob.ack([r.row_id for r in rows[::2]])  # ack half, leave half in flight
            acked |= {r.msg.msg_id for r in rows[::2]}
        assert got == _expected_order(list(range(n)))[: len(got)]
        assert ob.depth == n - len(acked)
    finally:
        await ob.close()
    # Reopen: totals come from the file, no row is indexed until a take needs it.
    ob = await Outbox.open(tmp_path / "ob.db", 10**9, page_rows=page)
    try:
        assert ob.indexed_rows == 0 and ob.depth == n - len(acked)
        rest = [r.msg.msg_id for r in await take_all(ob, limit=53)]
        assert ob.inflight == len(rest) and ob.indexed_rows == len(rest)
        assert rest == [m for m in _expected_order(list(range(n))) if m not in acked]
    finally:
        await ob.close()


async def test_python_heap_stays_flat_while_the_queue_grows(tmp_path: Path) -> None:
    import tracemalloc

    ob = await Outbox.open(tmp_path / "ob.db", 10**9)
    tracemalloc.start()
    try:
        await ob.put_many([msg(i, Priority(i % 5), size=200) for i in range(5000)])
        shallow, _ = tracemalloc.get_traced_memory()
        for first in range(5000, 25_000, 1000):
            await ob.put_many([msg(i, Priority(i % 5), size=200) for i in range(first, first + 1000)])
        deep, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await ob.close()
    # 20,000 more rows: an in-memory index of them costs ~86 B each on the Python heap alone
    # (1.7 MB, measured with the previous design). Allow noise, not growth.
    assert deep - shallow < 300_000, f"Python heap grew {deep - shallow} B for 20,000 more queued rows"


async def test_eviction_pages_in_victims_beyond_the_page(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "ob.db", 440, page_rows=4)  # 40 rows of 11 B
    try:
        await ob.put_many([msg(i, Priority.SAMPLES) for i in range(40)])
        assert ob.indexed_rows == 4 and ob.bytes == 440
        await ob.put(msg("big", Priority.RESULTS, size=219))  # 220 B: the 20 oldest samples go
        assert ob.evicted[Priority.SAMPLES] == 20 and sum(ob.evicted.values()) == 20
        assert ob.bytes == 440 and ob.depth == 21
        with pytest.raises(OutboxFullError, match="SAMPLES"):
            await ob.put(msg("x", Priority.SAMPLES, size=300))  # cannot evict the RESULTS row
        ids = [r.msg.msg_id for r in await take_all(ob, limit=7)]
        assert ids == ["mbig"] + [f"m{i}" for i in range(20, 40)]
    finally:
        await ob.close()


async def test_concurrent_producers_evicting_past_the_page_keep_exact_counts(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "ob.db", 1100, page_rows=8)  # 100 rows of 11 B
    try:
        await ob.put_many([msg(i, Priority.SAMPLES) for i in range(100)])

        async def producer(k: int) -> None:
            for j in range(30):
                await ob.put(msg(f"r{k}-{j}", Priority.RESULTS, size=10 + (j % 3) * 11))

        await asyncio.gather(*(producer(k) for k in range(4)))
        # 120 RESULTS rows of 11/22/33 B (2640 B) into 1100 B: every sample goes, then old results.
        assert ob.bytes <= 1100
        rows = await take_all(ob, limit=9)
        assert ob.depth == len(rows) and sum(len(r.msg.topic) + len(r.msg.payload) for r in rows) == ob.bytes
        evicted = ob.evicted
        assert evicted[Priority.SAMPLES] == 100
        assert evicted[Priority.RESULTS] == 120 - len(rows)
        for k in range(4):  # what is left of each producer is its newest messages, in order
            left = [int(r.msg.msg_id.split("-")[1]) for r in rows if r.msg.msg_id.startswith(f"mr{k}-")]
            assert left == list(range(30 - len(left), 30))
    finally:
        await ob.close()


async def test_released_rows_go_back_ahead_of_the_paged_ones(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "ob.db", 10**6, page_rows=4)
    try:
        await ob.put_many([msg(i) for i in range(20)])
        taken: list[Stored] = []
        while len(taken) < 9:  # across page boundaries (a take stops at the end of a page)
            taken += await asyncio.wait_for(ob.take(9 - len(taken)), WAIT)
        assert [r.msg.msg_id for r in taken] == [f"m{i}" for i in range(9)]
        ob.ack([taken[0].row_id])
        assert ob.release_inflight() == 8
        assert [r.msg.msg_id for r in await take_all(ob, limit=5)] == [f"m{i}" for i in range(1, 20)]
    finally:
        await ob.close()


async def test_expired_rows_paged_in_from_the_file_are_dropped_not_sent(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "ob.db", 10**6, page_rows=2)
    try:
        now = time.time()
        # Already expired when put (stored like any row): most of them wait in the file, not the page.
        deadlines = [now + 3600 if i % 3 else now - 1 for i in range(12)]
        await ob.put_many([msg(i, Priority.ESCALATION, expires_at=deadlines[i]) for i in range(12)])
        assert ob.indexed_rows == 2
        ids = [r.msg.msg_id for r in await take_all(ob, limit=3)]
        assert ids == [f"m{i}" for i in range(12) if i % 3]
        assert ob.expired[Priority.ESCALATION] == 4 and ob.depth == 8
    finally:
        await ob.close()
