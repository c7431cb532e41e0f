"""Bridges started together on one PostgreSQL registry all come up: creating the schema is serialised."""

from __future__ import annotations

import asyncio

import pytest

from cloud_bridge.registry import Registry, ResultAggregate

pytestmark = pytest.mark.timeout(90)


async def test_three_registries_create_one_schema_at_once(postgres_url: str) -> None:
    registries = [Registry(postgres_url) for _ in range(3)]
    try:
        await asyncio.gather(*(r.create() for r in registries))
        assert await registries[0].count(ResultAggregate) == 0
    finally:
        for r in registries:
            await r.close()
