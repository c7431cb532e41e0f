"""Model delivery over MQTT: devices ask for chunks, the bridge publishes them on the per-model topic.

A device sends a `ModelChunkRequest` (which chunks of which sha256 it still lacks) on
`.../model/request`; the bridge answers each chunk once on `{prefix}/{fleet}/models/{sha256}`, where
every device downloading that artifact (e.g. through the same gateway) receives it. So:

* requests are merged per (fleet, sha256): a chunk already queued is not queued twice, and a chunk
  published less than `coalesce_s` ago is not published again (devices asking at the same time);
* artifacts are served round-robin chunk by chunk, with at most `max_chunks_in_flight` publishes
  awaiting their PUBACK and optionally at most `max_chunks_per_s`, so a big model neither starves
  the bridge's other work nor the other downloads;
* a request is acked as soon as it is queued: it is not worth persisting, because a device asks again
  for whatever has not arrived after its chunk timeout.

An unknown sha256, an index past the end, or an undecodable request is logged and counted
(`stats.dead_letters`), and the process carries on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cloud_bridge.config import OtaConfig
from cloud_bridge.errors import MqttError
from cloud_bridge.models.store import ModelRecord, ModelStore
from cloud_bridge.mqtt import Incoming
from cloud_bridge.ota.deltas import DeltaArtifact, DeltaStore
from schemas.codec import decode_for_topic, encode
from schemas.errors import DecodeError
from schemas.messages import ModelChunk, ModelChunkRequest
from schemas.msgid import new_msg_id
from schemas.topics import Channel, Topics

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes, int], Awaitable[None]]
# What is served: a registered model or a patch between two (both have sha256, size and path).
Artifact = ModelRecord | DeltaArtifact
Ack = Callable[[Incoming], bool]
MODEL_REQUEST_SUFFIX = "/" + Channel.MODEL_REQUEST.value


def delivery_filter(topics: Topics, share_group: str, shared: bool) -> str:
    topic_filter = topics.filter(Channel.MODEL_REQUEST)
    return Topics.shared(share_group, topic_filter) if shared else topic_filter


@dataclass
class DeliveryStats:
    requests: int = 0
    chunks_requested: int = 0
    chunks_sent: int = 0
    bytes_sent: int = 0
    coalesced: int = 0
    publish_failures: int = 0
    unknown_models: int = 0
    bad_requests: int = 0

    @property
    def dead_letters(self) -> int:
        return self.unknown_models + self.bad_requests


@dataclass
class _Job:
    """The chunks still to send of one artifact in one fleet, answering the latest requester."""

    device_id: str
    indexes: set[int] = field(default_factory=set)


class ChunkServer:
    """Answers model chunk requests; `submit` from the MQTT callback, `run` as a task."""

    def __init__(
        self,
        topics: Topics,
        store: ModelStore,
        config: OtaConfig,
        publish: Publish,
        ack: Ack,
        deltas: DeltaStore | None = None,
    ) -> None:
        self._topics = topics
        self._store = store
        self._deltas = deltas  # patches are served like models, by their sha256
        self._config = config
        self._publish = publish
        self._ack = ack
        self._jobs: OrderedDict[tuple[str, str], _Job] = OrderedDict()
        self._records: dict[str, Artifact] = {}
        self._sent_at: dict[tuple[str, str, int], float] = {}
        self._window = asyncio.Semaphore(config.max_chunks_in_flight)
        self._inflight: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._closing = False
        self._next_send = 0.0
        self._picked = 0  # 1 while a chunk taken off the queue is not yet in flight
        self.stats = DeliveryStats()

    def submit(self, incoming: Incoming) -> None:
        """Called from the MQTT callback: validate, merge into the queue, ack. Never blocks."""
        try:
            request = decode_for_topic(self._topics, incoming.topic, incoming.payload)
            if not isinstance(request, ModelChunkRequest):
                raise DecodeError(f"expected a model request, got {type(request).__name__}")
        except DecodeError as exc:
            self.stats.bad_requests += 1
            log.warning("bad model request dead-lettered topic=%s field=%s reason=%s", incoming.topic, exc.field, exc)
            self._ack(incoming)
            return
        self.stats.requests += 1
        self.stats.chunks_requested += len(request.chunks)
        key = (request.fleet_id, request.sha256)
        job = self._jobs.get(key)
        if job is None:
            job = self._jobs[key] = _Job(request.device_id)
        job.device_id = request.device_id
        before = len(job.indexes)
        job.indexes.update(request.chunks)
        self.stats.coalesced += len(request.chunks) - (len(job.indexes) - before)
        log.debug(
            "model request device=%s/%s sha256=%s chunks=%d queued=%d",
            request.fleet_id,
            request.device_id,
            request.sha256[:12],
            len(request.chunks),
            len(job.indexes),
        )
        self._ack(incoming)
        self._wake.set()

    @property
    def backlog(self) -> int:
        """Chunks queued or being published."""
        return sum(len(j.indexes) for j in self._jobs.values()) + self._picked + len(self._inflight)

    async def close(self) -> None:
        """Stop taking jobs; chunks in flight finish (undelivered ones are asked for again)."""
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        try:
            while not self._closing:
                if not self._jobs:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                key, index, device_id = self._next_chunk()
                self._picked = 1
                try:
                    await self._serve(key, index, device_id)
                finally:
                    self._picked = 0
            if self._inflight:
                await asyncio.wait(self._inflight)
        finally:
            for task in self._inflight:
                task.cancel()

    def _next_chunk(self) -> tuple[tuple[str, str], int, str]:
        """Lowest missing chunk of the first artifact; the artifact then goes to the back (round-robin)."""
        key, job = self._jobs.popitem(last=False)
        index = min(job.indexes)
        job.indexes.discard(index)
        if job.indexes:
            self._jobs[key] = job
        return key, index, job.device_id

    async def _record(self, sha256: str) -> Artifact | None:
        if sha256 not in self._records:
            record: Artifact | None = await self._store.get_by_sha(sha256)
            if record is None and self._deltas is not None:
                record = self._deltas.find(sha256)
            if record is None:
                return None  # not cached: it may be registered later
            self._records[sha256] = record
        return self._records[sha256]

    async def _serve(self, key: tuple[str, str], index: int, device_id: str) -> None:
        fleet_id, sha256 = key
        record = await self._record(sha256)
        chunk_size = self._config.chunk_size
        if record is None:
            dropped = self._jobs.pop(key, None)
            self.stats.unknown_models += 1
            log.warning(
                "model request for unknown sha256=%s from %s/%s dropped chunks=%d: register it with "
                "`cloud-bridge models add`",
                sha256,
                fleet_id,
                device_id,
                1 + (len(dropped.indexes) if dropped else 0),
            )
            return
        chunks = max(1, math.ceil(record.size / chunk_size))
        if index >= chunks:
            self.stats.bad_requests += 1
            log.warning("model request for chunk %d of sha256=%s, which has %d chunks", index, sha256[:12], chunks)
            return
        now = time.monotonic()
        sent = self._sent_at.get((fleet_id, sha256, index))
        if sent is not None and now - sent < self._config.coalesce_s:
            self.stats.coalesced += 1
            return
        self._sent_at[(fleet_id, sha256, index)] = now
        if len(self._sent_at) > 100_000:
            self._forget_old(now)
        await self._pace()
        await self._window.acquire()
        task = asyncio.create_task(self._send(record, fleet_id, device_id, index, chunks))
        self._inflight.add(task)
        task.add_done_callback(self._sent)

    def _forget_old(self, now: float) -> None:
        horizon = now - self._config.coalesce_s
        self._sent_at = {k: t for k, t in self._sent_at.items() if t >= horizon}

    async def _pace(self) -> None:
        rate = self._config.max_chunks_per_s
        if rate <= 0:
            return
        loop = asyncio.get_running_loop()
        delay = self._next_send - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # rate pacing: the delay is the point, not a race workaround
        self._next_send = max(self._next_send, loop.time()) + 1.0 / rate

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._window.release()

    async def _send(self, record: Artifact, fleet_id: str, device_id: str, index: int, chunks: int) -> None:
        size = self._config.chunk_size
        try:
            data = await asyncio.to_thread(_read_chunk, record, index * size, size)
        except OSError as exc:
            self.stats.publish_failures += 1
            log.error("cannot read model artifact %s: %s", record.path, exc)
            return
        chunk = ModelChunk(
            msg_id=new_msg_id(),
            fleet_id=fleet_id,
            device_id=device_id,
            ts=time.time(),
            sha256=record.sha256,
            index=index,
            chunks=chunks,
            chunk_sha256=hashlib.sha256(data).hexdigest(),
            data=data,
        )
        try:
            await self._publish(self._topics.model_chunks(fleet_id, record.sha256), encode(chunk), 1)
        except MqttError as exc:
            # The device asks again after its chunk timeout; forget the send so that is not coalesced.
            self._sent_at.pop((fleet_id, record.sha256, index), None)
            self.stats.publish_failures += 1
            log.warning("chunk %d of %s not published: %s", index, record.sha256[:12], exc)
            return
        self.stats.chunks_sent += 1
        self.stats.bytes_sent += len(data)


def _read_chunk(record: Artifact, offset: int, size: int) -> bytes:
    fd = os.open(record.path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)
