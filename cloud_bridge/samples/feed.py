"""The labelers' feed: every sample the bridge archived, republished as JSON.

Devices on a billed link send samples in the compact encoding (schemas/compact.py), which a
labeling tool that subscribes to `.../samples` would have to decode with this project's code. So
once a batch with samples is committed, the bridge publishes each new sample as plain JSON
(sample/1, README "Topic map") on `{prefix}/{fleet}/{device}/samples/json`, QoS 1: a tool subscribes
to `fleet/+/+/samples/json` and gets exactly what the archive holds, whatever the device sent.
Publishing happens off the ingest path, through a queue; a sample that cannot be published (the
broker away) is counted and stays in the archive, where `cloud-bridge samples export` finds it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cloud_bridge.errors import MqttError
from cloud_bridge.workqueue import WorkQueue
from schemas.codec import encode
from schemas.messages import Sample
from schemas.topics import Channel, Topics

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes, int], Awaitable[None]]
MAX_QUEUED = 10_000  # samples waiting to be republished; beyond, the oldest are skipped (counted)


@dataclass
class FeedStats:
    published: int = 0
    failed: int = 0
    skipped: int = 0


class SampleFeed:
    def __init__(self, topics: Topics, publish: Publish) -> None:
        self._topics = topics
        self._publish = publish
        self._queue: WorkQueue[Sample] = WorkQueue()
        self.stats = FeedStats()

    def stored(self, samples: list[Sample]) -> None:
        """Samples a committed batch archived (called after the commit; never blocks)."""
        self._queue.put_many(samples)
        while len(self._queue) > MAX_QUEUED:
            self._queue.items.popleft()
            self.stats.skipped += 1

    async def close(self) -> None:
        self._queue.close()

    async def run(self) -> None:
        while await self._queue.ready():
            for sample in self._queue.take(256):
                topic = self._topics.device(sample.fleet_id, sample.device_id, Channel.SAMPLES_JSON)
                try:
                    await self._publish(topic, encode(sample), 1)
                except MqttError as exc:
                    self.stats.failed += 1
                    log.warning("sample not republished device=%s msg_id=%s: %s", sample.device_id, sample.msg_id, exc)
                    continue
                self.stats.published += 1
