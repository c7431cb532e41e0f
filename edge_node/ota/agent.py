"""Commands from the cloud on `.../cmd`: verified by `CommandGuard` (edge_node/ota/guard.py), run one
at a time by `OtaAgent`.

A command the guard refuses (signature, addressing, freshness, replay) is acked "rejected" with a
reason that starts with its code, and counted. Accepted commands are acked "received" (acks:
edge_node/ota/acks.py) and queued. "ping" is acked "done". "model_update" downloads
(edge_node/ota/download.py) and hands the verified file to the `Installer`; a newer model_update
supersedes a queued or downloading one (acked "failed", reason "superseded"). The accepted
model_update is kept in `state_dir/pending_update.json` until it finishes, so a restart resumes it.
"shadow_start" downloads the same way and hands the file to the `ShadowHost` (edge_node/ota/shadow.py:
run beside the active model, never installed); "shadow_stop" stops it. A shadow is not resumed after
a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from common.files import write_atomic
from edge_node.config import EdgeConfig
from edge_node.errors import CommandRejected, DownloadError
from edge_node.ota.acks import CommandAcks, Outbound
from edge_node.ota.download import ChunkSubscriptions, Downloader
from edge_node.ota.guard import CommandGuard, GuardPolicy, trusted_keys
from edge_node.uplink.link import IncomingMessage
from schemas.codec import decode, encode
from schemas.errors import DecodeError
from schemas.messages import Command

log = logging.getLogger(__name__)

_PENDING_FILE = "pending_update.json"


class Installer(Protocol):
    """Installs a verified model file (A/B slots, health check, swap); sends its own acks
    (installing/installed/done/health_failed/rolled_back). Implemented in edge_node/ota/installer.py."""

    async def install(self, model_path: Path, command: Command) -> None: ...

    async def rollback(self, command: Command) -> None: ...


class ShadowHost(Protocol):
    """Runs a verified model in shadow (edge_node/ota/shadow.py); sends its own acks."""

    async def start(self, model_path: Path, command: Command) -> None: ...

    async def stop(self, command: Command) -> None: ...


@dataclass
class AgentStats:
    received: int = 0
    undecodable: int = 0
    accepted: int = 0
    superseded: int = 0
    failed: int = 0


class OtaAgent:
    """Receives commands and chunks from the link, runs commands one at a time."""

    def __init__(
        self,
        state_dir: Path,
        guard: CommandGuard,
        acks: CommandAcks,
        downloader: Downloader,
        installer: Installer | None,
        shadow: ShadowHost | None = None,
    ) -> None:
        self._pending_path = Path(state_dir) / _PENDING_FILE
        self.guard = guard
        self.acks = acks
        self.downloader = downloader
        self.installer = installer
        self.shadow = shadow
        self._queue: deque[Command] = deque()
        self._wake = asyncio.Event()
        self._download: asyncio.Task[Path] | None = None
        # The link runs each message's handler as its own task: one at a time keeps the replay
        # record, the acks and the queue in arrival order.
        self._intake = asyncio.Lock()
        self._running: Command | None = None
        self.stats = AgentStats()
        self.idle = asyncio.Event()
        self.idle.set()

    # ---- inbound (from the link's message callback) ------------------------------------------

    async def on_command(self, message: IncomingMessage) -> None:
        """Verify, record and queue; the link acks the MQTT message after this returns."""
        async with self._intake:
            await self._take(message)

    async def _take(self, message: IncomingMessage) -> None:
        self.stats.received += 1
        try:
            command = decode(message.payload, Command)
        except DecodeError as exc:
            self.stats.undecodable += 1
            log.warning("undecodable command topic=%s error=%s", message.topic, exc)
            return
        try:
            self.guard.check(command)
        except CommandRejected as exc:
            log.warning("command rejected cmd_id=%s action=%s reason=%s", command.cmd_id, command.action, exc)
            await self.acks.send(command, "rejected", reason=str(exc))
            return
        if command.action == "model_update":
            await asyncio.to_thread(write_atomic, self._pending_path, encode(command), parents=True)
        await self.guard.accept(command)
        self.stats.accepted += 1
        log.info("command accepted cmd_id=%s action=%s", command.cmd_id, command.action)
        await self.acks.send(command, "received")
        await self._enqueue(command)

    def on_chunk(self, message: IncomingMessage) -> None:
        self.downloader.offer(message.topic, message.payload)

    async def _enqueue(self, command: Command) -> None:
        if command.action == "model_update":
            for old in [c for c in self._queue if c.action == "model_update"]:
                self._queue.remove(old)
                await self._supersede(old, command)
            running = self._running
            if running is not None and running.action == "model_update" and self._download is not None:
                self._download.cancel(f"superseded by {command.cmd_id}")
        self._queue.append(command)
        self.idle.clear()
        self._wake.set()

    async def _supersede(self, old: Command, new: Command) -> None:
        self.stats.superseded += 1
        await self.acks.send(old, "failed", reason=f"superseded: a newer model_update {new.cmd_id} arrived")

    # ---- the worker --------------------------------------------------------------------------

    async def run(self) -> None:
        await self._resume()
        while True:
            if not self._queue:
                self.idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            command = self._queue.popleft()
            self._running = command
            try:
                await self._execute(command)
            except Exception as exc:
                # A failing command (disk full, installer bug) must not take the node down with it.
                log.exception("command crashed cmd_id=%s action=%s", command.cmd_id, command.action)
                self._clear_pending(command)
                await self._fail(command, f"error: {type(exc).__name__}: {exc}")
            finally:
                self._running = None

    async def _resume(self) -> None:
        """Re-queue the model_update a previous run accepted but did not finish."""
        try:
            raw = await asyncio.to_thread(self._pending_path.read_bytes)
        except FileNotFoundError:
            return
        try:
            command = decode(raw, Command)
            self.guard.verify_signature(command)
        except (DecodeError, CommandRejected) as exc:
            log.error("pending update %s is not usable (%s): dropping it", self._pending_path, exc)
            self._pending_path.unlink(missing_ok=True)
            return
        log.info("resuming model_update cmd_id=%s after a restart", command.cmd_id)
        self._queue.append(command)

    async def _execute(self, command: Command) -> None:
        if command.action == "ping":
            await self.acks.send(command, "done")
        elif command.action == "rollback":
            if self.installer is None:
                await self._fail(command, "no_installer: this node has no model installer configured")
            else:
                await self.installer.rollback(command)
        elif command.action in ("shadow_start", "shadow_stop"):
            await self._shadow(command)
        else:
            await self._update(command)

    async def _shadow(self, command: Command) -> None:
        if self.shadow is None:
            await self._fail(command, "no_shadow: this node cannot run a shadow model")
        elif command.action == "shadow_stop":
            await self.shadow.stop(command)
        else:
            try:
                path = await self.downloader.fetch(command)
            except DownloadError as exc:
                await self._fail(command, str(exc))
                return
            await self.acks.send(command, "verifying", progress=1.0)
            await self.shadow.start(path, command)

    async def _update(self, command: Command) -> None:
        self._download = asyncio.create_task(self.downloader.fetch(command))
        try:
            path = await self._download
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # shutdown: the pending file stays, the next run resumes
            self.stats.superseded += 1
            await self.acks.send(command, "failed", reason="superseded: a newer model_update arrived")
            return
        except DownloadError as exc:
            await self._fail(command, str(exc))
            self._clear_pending(command)
            return
        finally:
            self._download = None
        self._clear_pending(command)
        await self.acks.send(command, "verifying", progress=1.0)
        if self.installer is None:
            await self._fail(command, f"no_installer: model verified at {path} but this node cannot install it")
            return
        await self.installer.install(path, command)

    async def _fail(self, command: Command, reason: str) -> None:
        self.stats.failed += 1
        log.warning("command failed cmd_id=%s reason=%s", command.cmd_id, reason)
        await self.acks.send(command, "failed", reason=reason)

    def _clear_pending(self, command: Command) -> None:
        # Only this command's record: a newer update may already have replaced the file.
        try:
            raw = self._pending_path.read_bytes()
            if decode(raw, Command).cmd_id == command.cmd_id:
                self._pending_path.unlink()
        except (FileNotFoundError, DecodeError):
            return


def build_agent(
    config: EdgeConfig,
    outbox: Outbound,
    acks: CommandAcks,
    subscriptions: ChunkSubscriptions,
    installer: Installer | None,
    local_models: Callable[[], list[Path]] = list,
    shadow: ShadowHost | None = None,
) -> OtaAgent:
    """The command guard, acks, downloader and agent of one node, from its config; `local_models`
    lists model files the node has outside its content store (bases for patches)."""
    dev, ota = config.device, config.ota
    state_dir = config.ota_state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    topics = config.topics
    guard = CommandGuard(
        state_dir,
        trusted_keys(ota.trusted_keys),
        GuardPolicy(dev.fleet_id, dev.device_id, ota.max_clock_skew_s, ota.replay_window_s),
    )
    if not ota.trusted_keys:
        log.warning("no [ota] trusted_keys configured: every command will be rejected as unknown_key")

    async def progress(command: Command, fraction: float) -> None:
        await acks.send(command, "downloading", progress=fraction)

    downloader = Downloader(
        state_dir,
        topics,
        dev.fleet_id,
        dev.device_id,
        outbox,
        subscriptions,
        progress,
        ota.chunk_timeout_s,
        ota.chunk_timeout_max_s,
        local_models,
    )
    return OtaAgent(state_dir, guard, acks, downloader, installer, shadow)
