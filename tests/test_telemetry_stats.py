"""The fleet-wide telemetry queries summed in SQL give what the per-row Python reading gave.

On the same rows, on a real SQLite file and a private PostgreSQL: the rollout judge's SQL sums
(RolloutStore.group_stats) against the rows read into Python and split as the judge did before
(RolloutStore.telemetry + stages.split_groups + policy.aggregate), and `cloud-bridge devices` against
sums over the messages themselves. The registry starts in the layout of the release before the summary
columns and holds rows it wrote (a JSON summary) and older ones (the body alone); it is then upgraded on
start (columns, index) and gets rows written now, so every kind of row is in the same sums.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from cloud_bridge.cli.devices import fleet_devices
from cloud_bridge.ingest.rows import add_message
from cloud_bridge.models.store import ModelRecord
from cloud_bridge.registry import Batch, Registry, TelemetryRow
from cloud_bridge.registry.telemetry_stats import has_old_rows
from cloud_bridge.rollout.policy import GroupStats, Thresholds, judge_window
from cloud_bridge.rollout.stages import FleetDevice, split_groups
from cloud_bridge.rollout.store import NewRollout, RolloutStore
from schemas import (
    ConfidenceStats,
    EscalationCounts,
    LatencyStats,
    ModelRef,
    OutboxStats,
    Status,
    Telemetry,
    new_msg_id,
)

FLEET = "f1"
OLD = ModelRef(name="digits-edge", version="1.0.0", sha256="a" * 64)
NEW = ModelRef(name="digits-edge", version="2.0.0", sha256="b" * 64)
TARGET = ModelRecord("digits-edge", "2.0.0", NEW.sha256, 1, Path("m.onnx"), ("0", "1"), (64,), {}, 0.0)
NEW_COLUMNS = (
    "rejected",
    "escalations_sent",
    "escalations_answered",
    "escalations_agreed",
    "confidence_mean",
    "latency_p95_ms",
    "outbox_depth",
)
NOW = time.time()
STAGE_STARTED = NOW - 300.0
WINDOW_S = 600.0
WATCH_FROM = NOW - 200.0


def window(device: str, model: ModelRef, end: float, k: int) -> Telemetry:
    """A window whose numbers vary with k: idle ones, ones without confidence, latency from the edge,
    from every answer (older devices) or neither, rejected inputs, an outbox that empties."""
    count = 0 if k % 7 == 3 else 20 + 13 * (k % 5)
    lat = LatencyStats(p50=1.0, p95=2.0 + k % 4, p99=9.0, max=9.0, mean=1.5)
    edge = LatencyStats(p50=0.5, p95=0.5 + 0.25 * (k % 3), p99=1.0, max=1.0, mean=0.6)
    sent = k % 6
    return Telemetry(
        msg_id=new_msg_id(), fleet_id=FLEET, device_id=device, ts=end, model=model, window_start=end - 10.0,
        window_end=end, window_seq=k, count=count, rejected=k % 3,
        latency_ms=lat if k % 4 != 1 and count else None,
        edge_latency_ms=edge if k % 4 in (0, 2) and count else None,
        confidence=ConfidenceStats(mean=0.6 + 0.03 * (k % 9), p05=0.3, min=0.2) if count and k % 5 != 4 else None,
        escalations=EscalationCounts(sent=sent, answered=max(0, sent - k % 2), agreed=max(0, sent - 1 - k % 2)),
        outbox=OutboxStats(depth=(k * 7) % 5),
    )  # fmt: skip


def device_windows(device: str, first_k: int, n: int) -> list[Telemetry]:
    """Windows every 10 s up to NOW; devices d0-d3 switch to the new model at the stage's start
    (d3 is a canary whose install is not done), the others stay on the old one."""
    out = []
    for k in range(first_k, first_k + n):
        end = NOW - 10.0 * (60 - k) - int(device[1:]) * 0.37
        switched = device in ("d0", "d1", "d2", "d3") and end >= STAGE_STARTED
        out.append(window(device, NEW if switched else OLD, end, k))
    return out


# d0-d7 have rows of every release; d8 only rows of the release before, d9 only older ones.
DEVICES = [f"d{i}" for i in range(10)]


async def write(registry: Registry, messages: list[Any], layout: str) -> None:
    """Store `messages` with the bridge's row-writing code, as the `layout`'s release stored them:
    "now" (summary columns), "summary" (the release before: a JSON summary, no columns) or "body"."""
    batch = Batch()
    for message in messages:
        add_message(batch, None, message, time.time())
    for row in batch.rows.get(TelemetryRow, []):
        if layout != "now":
            for column in NEW_COLUMNS:
                del row[column]
        if layout == "body":
            del row["summary"]  # SQL NULL, as in rows stored before the column (None would be JSON null)
    await registry.commit_batch(batch)


def make_old_layout(conn: Connection) -> None:
    """The telemetry table as the release before the summary columns made it."""
    conn.execute(text('DROP INDEX "ix_telemetry_stats"'))
    for column in NEW_COLUMNS:
        conn.execute(text(f'ALTER TABLE telemetry DROP COLUMN "{column}"'))
    conn.execute(text('CREATE INDEX "ix_telemetry_window_end" ON telemetry (window_end)'))


def layout_of(conn: Connection) -> tuple[set[str], set[str]]:
    inspector = inspect(conn)
    return {c["name"] for c in inspector.get_columns("telemetry")}, {
        str(i["name"]) for i in inspector.get_indexes("telemetry")
    }


def assert_same(sql: GroupStats, python: GroupStats) -> None:
    exact = ("devices", "windows", "inferences", "rejected", "escalations", "answered", "agreed")
    assert {k: getattr(sql, k) for k in exact} == {k: getattr(python, k) for k in exact}
    for name in ("confidence_mean", "latency_p95_ms"):
        got, want = getattr(sql, name), getattr(python, name)
        assert (got is None) == (want is None) and (want is None or got == pytest.approx(want, rel=1e-12)), name


async def check(url: str) -> None:
    registry = Registry(url)
    await registry.create()
    try:
        async with registry.engine.begin() as conn:
            await conn.run_sync(make_old_layout)
        statuses = [
            Status(msg_id=new_msg_id(), fleet_id=FLEET, device_id=d, ts=NOW, state="online", reason="connected",
                   model=NEW if d in ("d0", "d1", "d2", "d3") else OLD)
            for d in DEVICES
        ]  # fmt: skip
        await write(registry, statuses, "now")
        # d8 and d9 went silent before the upgrade: the last 250 s hold new rows only.
        windows = {d: device_windows(d, 0, 35 if d in ("d8", "d9") else 60) for d in DEVICES}
        # Oldest first, as the releases followed each other: body only, then summaries, then columns.
        mixed = DEVICES[:8]
        await write(registry, [w for d in mixed for w in windows[d][:20]] + windows["d9"], "body")
        await write(registry, [w for d in mixed for w in windows[d][20:35]] + windows["d8"], "summary")
        await registry.create()  # this release starts: columns and index added, the old index dropped
        async with registry.engine.connect() as conn:
            columns, indexes = await conn.run_sync(layout_of)
        assert set(NEW_COLUMNS) <= columns and "ix_telemetry_stats" in indexes
        assert "ix_telemetry_window_end" not in indexes
        await write(registry, [w for d in mixed for w in windows[d][35:]], "now")

        store = RolloutStore(registry)
        rid = await store.create(NewRollout(FLEET, TARGET, (50, 100), WINDOW_S, {}), now=STAGE_STARTED)
        await store.add_devices(
            rid, FLEET, 0, [FleetDevice(d, True, "digits-edge", "1.0.0", OLD.sha256) for d in DEVICES[:4]]
        )
        await store.update_devices(rid, [(d, {"state": "done"}) for d in DEVICES[:3]] + [("d3", {"state": "sent"})])
        rollout = await store.get(rid)
        assert rollout is not None
        # Watching began after the stage started (the canary's windows since then), and at the stage's start
        # (the control reaches back past every kind of row); and a range of new rows only (the SQL then
        # reads the columns alone).
        for watch_from, started, window_s in (
            (WATCH_FROM, STAGE_STARTED, WINDOW_S),
            (STAGE_STARTED, STAGE_STARTED, WINDOW_S),
            (WATCH_FROM, WATCH_FROM, 0.0),
        ):
            rollout = {**rollout, "watch_from": watch_from, "stage_started_at": started, "window_s": window_s}
            since = min(watch_from, started - window_s)
            async with registry.engine.connect() as conn:
                assert await has_old_rows(conn, since, FLEET) == (watch_from != WATCH_FROM or window_s > 0)
            before = split_groups(await store.telemetry(FLEET, since), rollout, {"d0", "d1", "d2"})
            now = await store.group_stats(rollout)
            assert before[0].windows > 0 and before[1].windows > 0
            for sql, python in zip(now, before, strict=True):
                assert_same(sql, python)
            for t in (Thresholds(min_inferences=50), Thresholds(max_confidence_drop=0.0, min_answered=1)):
                decisions = [judge_window(*groups, t, window_elapsed=True) for groups in (now, before)]
                assert decisions[0].verdict == decisions[1].verdict and decisions[0].reason == decisions[1].reason

        # control "devices": the canary devices' own windows before they switched, not the fleet's.
        canary = {"d0", "d1", "d2"}
        own = {**rollout, "watch_from": WATCH_FROM, "stage_started_at": STAGE_STARTED, "window_s": WINDOW_S}
        own["control"] = "devices"
        since = min(WATCH_FROM, STAGE_STARTED - WINDOW_S)
        theirs = [r for r in await store.telemetry(FLEET, since) if r["device_id"] in canary]
        before = split_groups(theirs, own, canary)
        now = await store.group_stats(own)
        assert now[1].devices == 3 and now[1].windows > 0
        for sql, python in zip(now, before, strict=True):
            assert_same(sql, python)
        fleet_control = (await store.group_stats({**own, "control": "fleet"}))[1]
        assert fleet_control.devices == len(DEVICES) and fleet_control.windows > now[1].windows
        # ...of the devices this stage switched: d2 switched in an earlier stage, judged then.
        await store.update_devices(rid, [("d2", {"stage": 1})])
        this_stage = {"d0", "d1"}
        before = split_groups([r for r in theirs if r["device_id"] in this_stage], own, this_stage)
        now = await store.group_stats(own)  # its stage: 0
        assert now[0].devices == 2 and now[1].devices == 2
        for sql, python in zip(now, before, strict=True):
            assert_same(sql, python)

        # 300 s reach back to rows of the release before; 200 s hold new rows only (d8 and d9: none).
        for recent_s in (300.0, 200.0):
            listed = {d["device_id"]: d for d in await fleet_devices(registry, NOW + 1, recent_s)}
            assert sorted(listed) == DEVICES
            for d in DEVICES:
                recent = [w for w in windows[d] if w.window_end >= NOW + 1 - recent_s]
                got = listed[d]
                if recent_s < 300 and d in ("d8", "d9"):
                    assert (got["inputs_per_s"], got["outbox_depth"]) == (None, None)
                    continue
                span = sum(w.window_end - w.window_start for w in recent)
                assert got["inputs_per_s"] == round(sum(w.count for w in recent) / span, 3)
                assert got["escalations_per_s"] == round(sum(w.escalations.sent for w in recent) / span, 3)
                assert got["outbox_depth"] == recent[-1].outbox.depth
    finally:
        await registry.close()


async def test_sql_sums_equal_the_row_by_row_reading_on_sqlite(tmp_path: Path) -> None:
    await check(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")


@pytest.mark.timeout(120)
async def test_sql_sums_equal_the_row_by_row_reading_on_postgresql(postgres_url: str) -> None:
    await check(postgres_url)
