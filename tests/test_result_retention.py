"""Result rows past `[registry] results_retention_s` are folded into result_aggregates and deleted:
the aggregates equal what the deleted rows said, on a real SQLite file and a real PostgreSQL, and
two bridges pruning one PostgreSQL registry at once count every row once. Telemetry rows past
`[registry] telemetry_retention_s` are deleted, the recent ones kept."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec
import pytest

from cloud_bridge.config import RegistryConfig
from cloud_bridge.ingest.rows import telemetry_row
from cloud_bridge.registry import Batch, Registry, ResultAggregate, ResultRow, TelemetryRow
from cloud_bridge.registry.retention import id_at, prune_registry, prune_results
from schemas import Telemetry, new_msg_id
from tests.factories import examples

pytestmark = pytest.mark.timeout(120)

NOW = 1_800_000_000.0
BUCKET = 300.0


def rows(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """`n` answers spread over the last 3 hours, from 5 devices, two model versions, three paths."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ts = NOW - rng.uniform(0, 3 * 3600)
        label = str(rng.randrange(10))
        truth = rng.choice([None, label, str(rng.randrange(10))])
        out.append(
            {
                "msg_id": new_msg_id(int(ts * 1e9)),
                "seq": 0,
                "fleet_id": "f1",
                "device_id": f"d{rng.randrange(5)}",
                "inference_id": f"i{i}",
                "model_version": rng.choice(["1.0.0", "1.1.0"]),
                "label": label,
                "path": rng.choice(["edge", "cloud", "edge_fallback"]),
                "confidence": rng.uniform(0.3, 1.0),
                "truth": truth,
                "ts": ts,
            }
        )
    return out


def expected(old: list[dict[str, Any]]) -> dict[tuple[str, str, str, str, float], tuple[int, float, int, int]]:
    agg: dict[tuple[str, str, str, str, float], list[float]] = defaultdict(lambda: [0, 0.0, 0, 0])
    for r in old:
        key = (r["fleet_id"], r["device_id"], r["model_version"], r["path"], (r["ts"] // BUCKET) * BUCKET)
        a = agg[key]
        a[0] += 1
        a[1] += r["confidence"]
        a[2] += r["truth"] is not None
        a[3] += r["truth"] == r["label"]
    return {k: (int(v[0]), v[1], int(v[2]), int(v[3])) for k, v in agg.items()}


async def stored(registry: Registry) -> dict[tuple[str, str, str, str, float], tuple[int, float, int, int]]:
    out = {}
    for a in await registry.rows(ResultAggregate):
        key = (a["fleet_id"], a["device_id"], a["model_version"], a["path"], float(a["bucket_start"]))
        assert a["bucket_s"] == BUCKET
        out[key] = (a["answers"], a["confidence_sum"], a["with_truth"], a["correct"])
    return out


async def check(registry: Registry, data: list[dict[str, Any]], retention_s: float, pruners: int = 1) -> None:
    await registry.create()
    await registry.commit_batch(Batch(rows={ResultRow: data}))
    await asyncio.gather(*(prune_results(registry, retention_s, BUCKET, now=NOW) for _ in range(pruners)))
    cut = id_at(NOW - retention_s)
    old = [r for r in data if r["msg_id"] < cut]
    kept = {(r["msg_id"], r["seq"]) for r in await registry.rows(ResultRow)}
    assert 0 < len(old) < len(data)
    assert kept == {(r["msg_id"], r["seq"]) for r in data if r["msg_id"] >= cut}
    got, want = await stored(registry), expected(old)
    assert got.keys() == want.keys()
    for key, (answers, conf, with_truth, correct) in want.items():
        assert got[key][0] == answers and got[key][2:] == (with_truth, correct)
        assert got[key][1] == pytest.approx(conf)
    # Pruning again changes nothing: every folded row is gone, nothing is counted twice.
    await prune_results(registry, retention_s, BUCKET, now=NOW)
    assert await stored(registry) == got


async def test_old_results_become_aggregates_on_sqlite(tmp_path: Path) -> None:
    registry = Registry(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    try:
        await check(registry, rows(3000), retention_s=3600)
    finally:
        await registry.close()


async def test_two_pruners_count_each_row_once_on_postgresql(postgres_url: str) -> None:
    registry = Registry(postgres_url)
    try:
        await check(registry, rows(3000, seed=2), retention_s=5400, pruners=2)
    finally:
        await registry.close()


async def test_retention_zero_keeps_every_row(tmp_path: Path) -> None:
    registry = Registry(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    try:
        await registry.create()
        data = rows(200)
        await registry.commit_batch(Batch(rows={ResultRow: data}))
        assert await prune_results(registry, 0, BUCKET, now=NOW) == 0
        assert await registry.count(ResultRow) == len(data)
    finally:
        await registry.close()


def test_bucket_must_divide_a_day() -> None:
    with pytest.raises(ValueError, match="results_bucket_s"):
        RegistryConfig(results_bucket_s=7).validate()
    with pytest.raises(ValueError, match="results_retention_s"):
        RegistryConfig(results_retention_s=-1).validate()
    with pytest.raises(ValueError, match="telemetry_retention_s"):
        RegistryConfig(telemetry_retention_s=-1).validate()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_telemetry_past_retention_is_deleted(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = (
        f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
        if engine == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    template = next(m for m in examples("f1", "d1") if isinstance(m, Telemetry))
    # One window every 10 s over the last 3 hours, from 4 devices, as ingestion writes them.
    windows = [
        msgspec.structs.replace(
            template,
            msg_id=new_msg_id(),
            device_id=f"d{i % 4}",
            window_start=NOW - 10 * i - 10,
            window_end=NOW - 10 * i,
        )
        for i in range(3 * 360)
    ]
    batch = Batch()
    for m in windows:
        batch.add_row(
            TelemetryRow,
            telemetry_row({"msg_id": m.msg_id, "fleet_id": m.fleet_id, "device_id": m.device_id}, m, batch.features),
        )
    registry = Registry(url)
    try:
        await registry.create()
        await registry.commit_batch(batch)
        config = RegistryConfig(telemetry_retention_s=3600 + 5, results_retention_s=0)
        await prune_registry(registry, config, now=NOW)
        kept = {r["msg_id"] for r in await registry.rows(TelemetryRow)}
        assert kept == {m.msg_id for m in windows if m.window_end >= NOW - 3605}
        assert len(kept) == 361
        await prune_registry(registry, RegistryConfig(telemetry_retention_s=0), now=NOW + 86400)
        assert await registry.count(TelemetryRow) == 361  # 0 keeps every row
    finally:
        await registry.close()
