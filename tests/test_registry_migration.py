"""A registry created before result/2 (results keyed by msg_id alone) is carried over on start:
the old table is kept as results_v1 with its rows, and the new table takes many answers per message.
Run on a real SQLite file and a private PostgreSQL server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import text

from cloud_bridge.registry import Batch, Registry, ResultRow

OLD_RESULTS = [
    "CREATE TABLE results (msg_id VARCHAR(36) NOT NULL PRIMARY KEY, fleet_id VARCHAR(64) NOT NULL,"
    " device_id VARCHAR(64) NOT NULL, inference_id VARCHAR(128) NOT NULL, model_version VARCHAR(64) NOT NULL,"
    " label VARCHAR(64) NOT NULL, path VARCHAR(16) NOT NULL, confidence FLOAT NOT NULL, truth VARCHAR(64),"
    " ts FLOAT NOT NULL)",
    "CREATE INDEX ix_results_device_id ON results (device_id)",
    "INSERT INTO results VALUES ('old-1', 'f1', 'd1', 'i1', '1.0.0', '3', 'edge', 0.9, NULL, 1.0)",
]


def _answer_row(seq: int) -> dict[str, object]:
    return {
        "msg_id": "new-1",
        "seq": seq,
        "fleet_id": "f1",
        "device_id": "d1",
        "inference_id": f"i{seq}",
        "model_version": "1.1.0",
        "label": "3",
        "path": "edge",
        "confidence": 0.8,
        "truth": None,
        "ts": time.time(),
    }


async def _check_migration(url: str) -> None:
    registry = Registry(url)
    try:
        async with registry.engine.begin() as conn:
            for statement in OLD_RESULTS:
                await conn.execute(text(statement))
        await registry.create()
        await registry.create()  # a second start finds the new layout and leaves it alone
        batch = Batch()
        for seq in range(3):
            batch.add_row(ResultRow, _answer_row(seq))
        await registry.commit_batch(batch)
        async with registry.engine.connect() as conn:
            old = (await conn.execute(text("SELECT msg_id, label FROM results_v1"))).all()
            new = (await conn.execute(text("SELECT msg_id, seq FROM results ORDER BY seq"))).all()
        assert [tuple(r) for r in old] == [("old-1", "3")]
        assert [tuple(r) for r in new] == [("new-1", 0), ("new-1", 1), ("new-1", 2)]
    finally:
        await registry.close()


async def test_old_results_table_is_kept_and_replaced_on_sqlite(tmp_path: Path) -> None:
    await _check_migration(f"sqlite+aiosqlite:///{tmp_path / 'registry.sqlite'}")


@pytest.mark.timeout(90)
async def test_old_results_table_is_kept_and_replaced_on_postgresql(postgres_url: str) -> None:
    await _check_migration(postgres_url)


async def _check_new_columns(url: str) -> None:
    """A devices table made before status_order gets the column on start, rows kept."""
    registry = Registry(url)
    try:
        await registry.create()
        async with registry.engine.begin() as conn:
            await conn.execute(text("ALTER TABLE devices DROP COLUMN status_order"))
            await conn.execute(
                text(
                    "INSERT INTO devices (fleet_id, device_id, online, last_seen, messages, telemetry_windows,"
                    " samples, results) VALUES ('f1', 'd1', true, 1.0, 1, 0, 0, 0)"
                )
            )
        await registry.create()
        await registry.create()  # a second start finds the column and leaves it alone
        async with registry.engine.connect() as conn:
            rows = (await conn.execute(text("SELECT device_id, online, status_order FROM devices"))).all()
        assert [(r[0], bool(r[1]), r[2]) for r in rows] == [("d1", True, None)]
    finally:
        await registry.close()


async def test_devices_table_gets_new_columns_on_sqlite(tmp_path: Path) -> None:
    await _check_new_columns(f"sqlite+aiosqlite:///{tmp_path / 'registry.sqlite'}")


@pytest.mark.timeout(90)
async def test_devices_table_gets_new_columns_on_postgresql(postgres_url: str) -> None:
    await _check_new_columns(postgres_url)
