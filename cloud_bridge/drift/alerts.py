"""Publishing drift alerts to `{prefix}/{fleet}/alerts` (QoS 1), at least once.

An alert is committed to the registry (`drift_episodes`, with its encoded payload and
`published = false`) in the same transaction as the telemetry that caused it; only then is it handed
here. Each one is published and, once the broker acknowledged it, marked published. Alerts a bridge
could not publish before it stopped or crashed are still unpublished in the database, and the next
bridge to start publishes them (with the same msg_id, so a consumer that saw one already drops it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from cloud_bridge.drift.store import PendingAlert
from cloud_bridge.errors import MqttError
from cloud_bridge.registry import DriftEpisodeRow, Registry
from cloud_bridge.workqueue import WorkQueue
from schemas.topics import Topics

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes, int], Awaitable[None]]
_RETRY_MIN_S = 0.2
_RETRY_MAX_S = 5.0


@dataclass(frozen=True)
class _Outgoing:
    fleet_id: str
    msg_id: str
    payload: bytes


@dataclass
class AlertStats:
    published: int = 0
    failures: int = 0
    recovered: int = 0


class AlertPublisher:
    """Publishes committed alerts in order, retrying while the broker is unreachable."""

    def __init__(self, topics: Topics, registry: Registry, publish: Publish) -> None:
        self._topics = topics
        self._registry = registry
        self._publish = publish
        self._queue: WorkQueue[_Outgoing] = WorkQueue()
        self._progress = asyncio.Condition()
        self.stats = AlertStats()

    def submit(self, alerts: Sequence[PendingAlert]) -> None:
        """Called by ingestion after the commit: cheap, never blocks."""
        self._queue.put_many(_Outgoing(a.alert.fleet_id, a.alert.msg_id, a.payload) for a in alerts)

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def close(self) -> None:
        """Stop once the queue is empty or the broker refuses (what is left stays unpublished in the DB)."""
        self._queue.close()

    async def run(self) -> None:
        await self._recover()
        delay = _RETRY_MIN_S
        while await self._queue.ready():
            item = self._queue.items[0]
            try:
                await self._publish(self._topics.alerts(item.fleet_id), item.payload, 1)
            except MqttError as exc:
                self.stats.failures += 1
                if self._queue.closing:
                    log.warning("alerts left unpublished at shutdown count=%d error=%s", len(self._queue), exc)
                    return
                log.warning("alert publish failed msg_id=%s error=%s retry_s=%.1f", item.msg_id, exc, delay)
                await self._queue.pause(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            delay = _RETRY_MIN_S
            self._queue.items.popleft()
            await self._mark_published(item.msg_id)
            self.stats.published += 1
            async with self._progress:
                self._progress.notify_all()

    async def wait_for(self, predicate: Callable[[AlertStats], bool]) -> None:
        """Wait until `predicate(stats)` holds after some publish (for tests and drains)."""
        async with self._progress:
            await self._progress.wait_for(lambda: predicate(self.stats))

    async def _recover(self) -> None:
        query = (
            select(DriftEpisodeRow.fleet_id, DriftEpisodeRow.alert_msg_id, DriftEpisodeRow.payload)
            .where(DriftEpisodeRow.published.is_(False))
            .order_by(DriftEpisodeRow.created_at)
        )
        async with self._registry.engine.connect() as conn:
            rows = [_Outgoing(f, m, bytes(p)) for f, m, p in await conn.execute(query)]
        if rows:
            known = {o.msg_id for o in self._queue.items}
            self._queue.items.extendleft(reversed([r for r in rows if r.msg_id not in known]))
            self.stats.recovered += len(rows)
            log.info("republishing alerts left unpublished by an earlier run count=%d", len(rows))

    async def _mark_published(self, msg_id: str) -> None:
        # Alerts are rare (episodes, not windows): one small transaction each is fine.
        stmt = update(DriftEpisodeRow).where(DriftEpisodeRow.alert_msg_id == msg_id).values(published=True)
        try:
            async with self._registry.engine.begin() as conn:
                await conn.execute(stmt)
        except SQLAlchemyError as exc:
            # Published but not marked: the next start publishes it again (same msg_id, consumers dedup).
            log.error("cannot mark alert published msg_id=%s error=%s", msg_id, exc)
