"""Bridges writing one PostgreSQL registry at once: the schema is created once, counts never deadlock."""

from __future__ import annotations

import asyncio

import pytest

from cloud_bridge.registry import Agreement, Registry, ResultAggregate

pytestmark = pytest.mark.timeout(90)


async def test_three_registries_create_one_schema_at_once(postgres_url: str) -> None:
    registries = [Registry(postgres_url) for _ in range(3)]
    try:
        await asyncio.gather(*(r.create() for r in registries))
        assert await registries[0].count(ResultAggregate) == 0
    finally:
        for r in registries:
            await r.close()


async def test_two_bridges_add_agreement_counts_for_the_same_devices_at_once(postgres_url: str) -> None:
    """Counts for overlapping devices, given in opposite orders, many times at once: every count lands
    and no transaction deadlocks (rows are locked in key order)."""
    a, b = Registry(postgres_url), Registry(postgres_url)
    try:
        await a.create()
        keys = [("f1", f"d{i:03d}", "1.0.0") for i in range(200)]
        forward = [(k, (2, 1)) for k in keys]
        backward = [(k, (2, 1)) for k in reversed(keys)]
        await asyncio.gather(
            *(a.add_agreement(forward) for _ in range(5)), *(b.add_agreement(backward) for _ in range(5))
        )
        rows = await a.rows(Agreement)
        assert len(rows) == len(keys)
        assert {(r["answered"], r["agreed"]) for r in rows} == {(20, 10)}
    finally:
        await a.close()
        await b.close()
