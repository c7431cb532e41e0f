"""Resumable, verified model download over MQTT chunks (the device side of cloud_bridge/ota/delivery.py).

    state_dir/models/{sha256}.onnx        the content store: only whole, verified files ever land here
    state_dir/staging/{sha256}.part       chunks written at their offsets as they arrive
    state_dir/staging/{sha256}.bitmap     which chunks of .part are durably written (edge_node/ota/staging.py)

A download subscribes to the model's chunk topic, asks (through the outbox, so the request survives
a cut) for every chunk its bitmap lacks, writes each chunk whose sha256 matches, and records it in the
bitmap only after the data is fsynced: after a cut or a restart it asks only for what is missing.
Without progress for `chunk_timeout_s` it asks again, backing off to `chunk_timeout_max_s`. At the end
the whole file must have the announced size and sha256, or it is thrown away: a partial or forged
file is never trusted. A file already in the content store is not downloaded again.

An update may offer a binary patch (`ModelUpdate.delta`, bsdiff4) from a model the device has (in
the content store, or the one it runs: `local_models`). Then the patch is fetched the same way
(staging keyed by the patch's sha256), applied to the local copy, and the result must hash to the
model's sha256 before it enters the content store; if the patch cannot be fetched, applied or
verified, the whole model is fetched instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import bsdiff4

from common.files import file_sha256, write_atomic
from edge_node.errors import DownloadError
from edge_node.ota.acks import Outbound
from edge_node.ota.staging import Artifact, Staging
from edge_node.uplink.outbox import OutMessage, Priority
from schemas.codec import decode_for_topic, encode
from schemas.errors import DecodeError
from schemas.messages import Command, ModelChunk, ModelChunkRequest, ModelUpdate
from schemas.msgid import new_msg_id
from schemas.topics import Channel, Topics

log = logging.getLogger(__name__)

MAX_INDEXES_PER_REQUEST = 4096  # the schema's limit on ModelChunkRequest.chunks
_QUEUE_LIMIT = 4096
_PROGRESS_STEP = 0.1


class ChunkSubscriptions(Protocol):
    """What the downloader needs from the MQTT link (edge_node/uplink/link.py Link)."""

    def add_subscription(self, topic: str, qos: int = 1) -> None: ...

    def remove_subscription(self, topic: str) -> None: ...


# (command, progress 0..1) -> sends a "downloading" ack
Progress = Callable[[Command, float], Awaitable[None]]


@dataclass
class DownloadStats:
    downloads: int = 0
    reused: int = 0
    resumed: int = 0
    chunks_received: int = 0
    chunks_written: int = 0
    duplicate_chunks: int = 0
    bad_chunks: int = 0
    stray_chunks: int = 0
    dropped_chunks: int = 0
    requests: int = 0
    rerequests: int = 0
    verify_failures: int = 0
    patched: int = 0  # models built from a local one and a downloaded patch
    patch_fallbacks: int = 0  # patches that failed: the whole model was fetched instead
    # The chunk indexes of every request sent (for operators' logs and tests).
    requested: list[list[int]] = field(default_factory=list)


def _check_artifact(topics: Topics, fleet_id: str, artifact: Artifact) -> None:
    if artifact.chunks != artifact.expected_chunks:
        raise DownloadError(
            "bad_update",
            f"{artifact.chunks} chunks cannot hold {artifact.size} bytes of {artifact.chunk_size}-byte chunks",
        )
    expected_topic = topics.model_chunks(fleet_id, artifact.sha256)
    if artifact.chunk_topic != expected_topic:
        raise DownloadError("bad_update", f"chunk_topic {artifact.chunk_topic!r} is not {expected_topic!r}")


@dataclass
class _Active:
    command: Command
    artifact: Artifact
    queue: asyncio.Queue[ModelChunk]


class Downloader:
    """Fetches verified model files into `state_dir/models`; one download at a time."""

    def __init__(
        self,
        state_dir: Path,
        topics: Topics,
        fleet_id: str,
        device_id: str,
        outbox: Outbound,
        subscriptions: ChunkSubscriptions,
        progress: Progress,
        chunk_timeout_s: float,
        chunk_timeout_max_s: float,
        local_models: Callable[[], list[Path]] = list,
    ) -> None:
        self.store_dir = Path(state_dir) / "models"
        # Model files the device has outside the content store (the one it runs): patch bases.
        self._local_models = local_models
        self.staging_dir = Path(state_dir) / "staging"
        self._topics = topics
        self._fleet_id = fleet_id
        self._device_id = device_id
        self._outbox = outbox
        self._subs = subscriptions
        self._progress = progress
        self._timeout_s = chunk_timeout_s
        self._timeout_max_s = chunk_timeout_max_s
        self._active: _Active | None = None
        self.stats = DownloadStats()

    def content_path(self, sha256: str) -> Path:
        return self.store_dir / f"{sha256}.onnx"

    def offer(self, topic: str, payload: bytes) -> None:
        """A message on a chunk topic (from the MQTT callback): queue it for the active download."""
        self.stats.chunks_received += 1
        try:
            chunk = decode_for_topic(self._topics, topic, payload)
        except DecodeError as exc:
            self.stats.bad_chunks += 1
            log.warning("undecodable model chunk topic=%s error=%s", topic, exc)
            return
        active = self._active
        if not isinstance(chunk, ModelChunk) or active is None or chunk.sha256 != active.artifact.sha256:
            # A chunk of another device's download, or one redelivered after ours finished.
            self.stats.stray_chunks += 1
            return
        try:
            active.queue.put_nowait(chunk)
        except asyncio.QueueFull:
            self.stats.dropped_chunks += 1  # asked for again after the chunk timeout

    async def fetch(self, command: Command) -> Path:
        """The verified file of `command.update` in the content store, downloading what is missing
        (a patch from a local model when the update offers one, else the model)."""
        update = command.update
        if update is None:
            raise DownloadError("bad_update", f"command {command.cmd_id} ({command.action}) carries no update")
        model = Artifact.model(update)
        _check_artifact(self._topics, self._fleet_id, model)
        dest = self.content_path(update.model.sha256)
        if await asyncio.to_thread(self._already_have, dest, update.model.sha256):
            self.stats.reused += 1
            log.info("model %s already in the content store: not downloading", update.model.sha256[:12])
            return dest
        if update.delta is not None:
            base = await asyncio.to_thread(self._local_copy, update.delta.base_sha256)
            if base is not None:
                try:
                    return await self._fetch_patched(command, update, base, dest)
                except DownloadError as exc:
                    self.stats.patch_fallbacks += 1
                    log.warning("model patch failed (%s): fetching the whole model", exc)
        return await self._fetch_artifact(command, model, dest)

    async def _fetch_patched(self, command: Command, update: ModelUpdate, base: Path, dest: Path) -> Path:
        patch = Artifact.patch(update)
        _check_artifact(self._topics, self._fleet_id, patch)
        patch_path = self.staging_dir / f"{patch.sha256}.bsdiff"
        await self._fetch_artifact(command, patch, patch_path)
        try:
            await asyncio.to_thread(_apply_patch, base, patch_path, dest, update)
        finally:
            patch_path.unlink(missing_ok=True)
        self.stats.patched += 1
        log.info(
            "model %s built from %s with a %d-byte patch (the model is %d bytes)",
            update.model.sha256[:12],
            base.name,
            patch.size,
            update.size,
        )
        return dest

    def _local_copy(self, sha256: str) -> Path | None:
        """A local file holding the model `sha256` (checked by hashing it), if the device has one."""
        for path in [self.content_path(sha256), *self._local_models()]:
            if path.is_file() and file_sha256(path) == sha256:
                return path
        return None

    async def _fetch_artifact(self, command: Command, artifact: Artifact, dest: Path) -> Path:
        """Download `artifact` into `dest` (verified size and sha256), resuming what is staged."""
        staging = Staging(self.staging_dir, artifact)
        held = await asyncio.to_thread(staging.load)
        if held:
            self.stats.resumed += 1
        log.info(
            "download start sha256=%s size=%d chunks=%d held=%d",
            artifact.sha256[:12],
            artifact.size,
            staging.chunks,
            held,
        )
        self._active = _Active(command, artifact, asyncio.Queue(_QUEUE_LIMIT))
        self._subs.add_subscription(artifact.chunk_topic, 1)
        try:
            await self._receive(self._active, staging)
            failure = await asyncio.to_thread(staging.finish, dest)
        finally:
            self._active = None
            self._subs.remove_subscription(artifact.chunk_topic)
        if failure is not None:
            self.stats.verify_failures += 1
            raise DownloadError("verify_failed", failure)
        self.stats.downloads += 1
        log.info("download verified sha256=%s path=%s", artifact.sha256[:12], dest)
        return dest

    @staticmethod
    def _already_have(dest: Path, sha256: str) -> bool:
        if not dest.exists():
            return False
        if file_sha256(dest) == sha256:
            return True
        log.error("content store file %s does not match its name: removing it and downloading again", dest)
        dest.unlink()
        return False

    async def _receive(self, active: _Active, staging: Staging) -> None:
        timeout = self._timeout_s
        next_report = (staging.count() / staging.chunks // _PROGRESS_STEP + 1) * _PROGRESS_STEP
        missing = staging.missing()
        if missing:
            await self._request(active, missing)
        while missing:
            try:
                async with asyncio.timeout(timeout):
                    first = await active.queue.get()
            except TimeoutError:
                timeout = min(timeout * 2, self._timeout_max_s)
                self.stats.rerequests += 1
                log.info("no model chunk for %.1fs: asking again for %d missing chunks", timeout / 2, len(missing))
                await self._request(active, missing)
                continue
            batch = [first]
            while not active.queue.empty():
                batch.append(active.queue.get_nowait())
            accepted = self._accept(staging, batch)
            if not accepted:
                continue
            await asyncio.to_thread(staging.write, accepted)
            self.stats.chunks_written += len(accepted)
            timeout = self._timeout_s
            missing = staging.missing()
            done = 1.0 - len(missing) / staging.chunks
            if done >= next_report and missing:
                next_report = (done // _PROGRESS_STEP + 1) * _PROGRESS_STEP
                await self._progress(active.command, round(done, 3))

    def _accept(self, staging: Staging, batch: list[ModelChunk]) -> list[tuple[int, bytes]]:
        """The chunks of `batch` that are new and verify; bad ones are counted and dropped."""
        accepted: dict[int, bytes] = {}
        artifact = staging.artifact
        for chunk in batch:
            if staging.holds(chunk.index) or chunk.index in accepted:
                self.stats.duplicate_chunks += 1
                continue
            reason = _chunk_problem(chunk, staging.chunks)
            data = chunk.data
            if reason is None:
                if hashlib.sha256(data).hexdigest() != chunk.chunk_sha256:
                    reason = "data does not hash to chunk_sha256"
                elif len(data) != _chunk_length(artifact, chunk.index):
                    reason = f"{len(data)} bytes, expected {_chunk_length(artifact, chunk.index)}"
            if reason is not None:
                self.stats.bad_chunks += 1
                log.warning("model chunk %d of %s refused: %s", chunk.index, artifact.sha256[:12], reason)
                continue
            accepted[chunk.index] = data
        return sorted(accepted.items())

    async def _request(self, active: _Active, missing: list[int]) -> None:
        topic = self._topics.device(self._fleet_id, self._device_id, Channel.MODEL_REQUEST)
        command = active.command
        for start in range(0, len(missing), MAX_INDEXES_PER_REQUEST):
            indexes = missing[start : start + MAX_INDEXES_PER_REQUEST]
            request = ModelChunkRequest(
                msg_id=new_msg_id(),
                fleet_id=self._fleet_id,
                device_id=self._device_id,
                ts=time.time(),
                cmd_id=command.cmd_id,
                sha256=active.artifact.sha256,
                chunks=indexes,
            )
            await self._outbox.put(
                OutMessage(
                    topic=topic,
                    payload=encode(request),
                    priority=Priority.CONTROL,
                    msg_id=request.msg_id,
                    # A request outliving the backoff would only duplicate a newer one.
                    expires_at=time.time() + self._timeout_max_s,
                )
            )
            self.stats.requests += 1
            self.stats.requested.append(indexes)


def _chunk_problem(chunk: ModelChunk, chunks: int) -> str | None:
    if chunk.chunks != chunks:
        return f"says the model has {chunk.chunks} chunks, the command says {chunks}"
    if chunk.index >= chunks:
        return f"index {chunk.index} is past the last chunk {chunks - 1}"
    return None


def _chunk_length(artifact: Artifact, index: int) -> int:
    return min(artifact.chunk_size, artifact.size - index * artifact.chunk_size)


def _apply_patch(base: Path, patch: Path, dest: Path, update: ModelUpdate) -> None:
    """Patch `base` into the update's model and put it into the content store, only if it is
    exactly that model (size and sha256)."""
    try:
        data = bsdiff4.patch(base.read_bytes(), patch.read_bytes())
    except (ValueError, OSError, MemoryError) as exc:  # a corrupt or foreign patch (bz2 data errors are OSError)
        raise DownloadError("patch_failed", f"cannot apply the patch to {base.name}: {exc}") from None
    if len(data) != update.size or hashlib.sha256(data).hexdigest() != update.model.sha256:
        raise DownloadError(
            "patch_failed",
            f"the patched model is not {update.model.sha256[:12]} ({len(data)} bytes, {update.size} announced)",
        )
    write_atomic(dest, data, parents=True)
