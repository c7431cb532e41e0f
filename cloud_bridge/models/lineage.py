"""Model lineage: where a registered model came from (base model, dataset version, trainer, metrics),
in the registry's `model_lineage` table beside `models`. Written once per name+version; writing the
same again is a no-op, so a loop that resumes after a crash records it once."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from cloud_bridge.registry import ModelLineageRow, Registry


@dataclass(frozen=True)
class Lineage:
    name: str
    version: str
    base_name: str | None
    base_version: str | None
    dataset_id: str | None
    trainer: str
    metrics: dict[str, Any]


async def record_lineage(registry: Registry, lineage: Lineage) -> None:
    try:
        async with registry.engine.begin() as conn:
            await conn.execute(
                insert(ModelLineageRow).values(
                    name=lineage.name,
                    version=lineage.version,
                    base_name=lineage.base_name,
                    base_version=lineage.base_version,
                    dataset_id=lineage.dataset_id,
                    trainer=lineage.trainer[:1024],
                    metrics=lineage.metrics,
                    created_at=time.time(),
                )
            )
    except IntegrityError:
        pass  # recorded already (a resumed loop): the first record stands


async def get_lineage(registry: Registry, name: str, version: str) -> Lineage | None:
    async with registry.engine.connect() as conn:
        row = (
            await conn.execute(
                select(ModelLineageRow.__table__).where(
                    ModelLineageRow.name == name, ModelLineageRow.version == version
                )
            )
        ).first()
    if row is None:
        return None
    return Lineage(
        row.name, row.version, row.base_name, row.base_version, row.dataset_id, row.trainer, dict(row.metrics)
    )
