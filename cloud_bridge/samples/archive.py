"""The archive of uncertain samples (the registry's `samples` table), kept within its bounds.

Ingestion archives every `sample/1` message, tensor bytes included; the bridge's hourly prune calls
`prune_samples` so the archive stays within `[samples] max_rows` and `max_age_days`. Age is arrival
age (`received_at`), so samples a device held back while offline are not pruned early.
"""

from __future__ import annotations

from sqlalchemy import and_, delete, func, or_, select

from cloud_bridge.config import SamplesConfig
from cloud_bridge.registry import Registry, SampleRow


async def prune_samples(registry: Registry, bounds: SamplesConfig, now: float) -> int:
    """Delete samples archived more than `max_age_days` ago, then the oldest beyond `max_rows`."""
    deleted = 0
    s = SampleRow
    async with registry.engine.begin() as conn:
        if bounds.max_age_days > 0:
            cutoff = now - bounds.max_age_days * 86400.0
            old = or_(s.received_at < cutoff, and_(s.received_at.is_(None), s.ts < cutoff))
            deleted += int((await conn.execute(delete(s).where(old))).rowcount)
        if bounds.max_rows > 0:
            rows = int((await conn.execute(select(func.count()).select_from(s))).scalar_one())
            excess = rows - bounds.max_rows
            if excess > 0:
                oldest = select(s.msg_id).order_by(func.coalesce(s.received_at, s.ts), s.msg_id).limit(excess)
                deleted += int((await conn.execute(delete(s).where(s.msg_id.in_(oldest.scalar_subquery())))).rowcount)
    return deleted
