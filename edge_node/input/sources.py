"""Where inputs come from: an MQTT input topic, a watched directory, or a dataset replay
(edge_node/input/replay.py).

Every source turns what it reads into `InputItem`s on the pipeline's bounded intake
(edge_node/input/intake.py). An input that cannot even be read becomes an item carrying its rejection, so
the pipeline counts it in telemetry like any other bad input and the source goes on.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_node.config import SourceConfig
from edge_node.errors import InputRejected, IntakeFull
from edge_node.input.intake import InputItem, Intake
from schemas import DecodeError, Input, decode, decode_tensor

log = logging.getLogger(__name__)


class InputIds:
    """Short unique ids: a random boot prefix and a counter (`a1b2c3d4-17`)."""

    def __init__(self) -> None:
        self._boot = secrets.token_hex(4)
        self._seq = 0

    def next(self) -> str:
        self._seq += 1
        return f"{self._boot}-{self._seq}"


class Source(Protocol):
    async def run(self) -> None: ...


class MqttInputSource:
    """Inputs published to the device's `.../input` topic; fed by the link's message handler."""

    RECENT_IDS = 4096

    def __init__(self, queue: Intake, ids: InputIds) -> None:
        self._queue = queue
        self._ids = ids
        self.overloaded = 0
        self.duplicates = 0
        self.stopping = False  # the node is draining: inputs are no longer taken
        self.dropped_stopping = 0
        # QoS 1 is at-least-once: after a reconnect the broker may redeliver an input already taken.
        self._recent: OrderedDict[str, None] = OrderedDict()

    def take_overloaded(self) -> int:
        """Inputs dropped because the intake was full, since the last call (for telemetry)."""
        n, self.overloaded = self.overloaded, 0
        return n

    def _is_duplicate(self, msg_id: str) -> bool:
        if msg_id in self._recent:
            self.duplicates += 1
            return True
        self._recent[msg_id] = None
        if len(self._recent) > self.RECENT_IDS:
            self._recent.popitem(last=False)
        return False

    async def run(self) -> None:
        try:
            await asyncio.Event().wait()  # passive: `offer` is called for each MQTT message
        finally:
            # Cancelled: the node is stopping. Inputs that still arrive until the link closes are
            # not taken, or a steady stream would keep the drain (`queue.join()`, outstanding
            # escalations) from ever ending: a node fed at 20 Hz did not stop on SIGTERM.
            self.stopping = True

    def offer(self, payload: bytes, topic: str) -> None:
        if self.stopping:
            self.dropped_stopping += 1
            log.warning("input dropped topic=%s reason=stopping (the node is shutting down)", topic)
            return
        now = asyncio.get_running_loop().time()
        try:
            message = decode(payload, Input)
            if self._is_duplicate(message.msg_id):
                log.info("duplicate input msg_id=%s ignored", message.msg_id)
                return
            item = InputItem(
                input_id=message.input_id,
                array=decode_tensor(message.tensor, field="$.tensor", allow_nonfinite=True),
                accepted_at=now,
                truth=message.truth,
                source_ref=f"mqtt:{message.msg_id}",
            )
        except DecodeError as exc:
            log.warning("input rejected topic=%s reason=undecodable error=%s", topic, exc)
            item = InputItem(
                self._ids.next(), None, now, source_ref=f"mqtt:{topic}", error=InputRejected("undecodable", str(exc))
            )
        try:
            self._queue.put_nowait(item)
        except IntakeFull:
            # Blocking here would stall the MQTT connection (and its keep-alive) behind inference.
            self.overloaded += 1
            log.warning("input dropped topic=%s reason=overloaded queue=%d", topic, self._queue.qsize())


class DirectorySource:
    """`.npy` files dropped into a folder: each processed once, then moved to done/ or failed/."""

    def __init__(self, queue: Intake, ids: InputIds, path: Path, poll_s: float) -> None:
        self._queue = queue
        self._ids = ids
        self.path = path
        self.poll_s = poll_s
        self._seen: set[str] = set()
        for sub in ("done", "failed"):
            (path / sub).mkdir(parents=True, exist_ok=True)

    async def run(self) -> None:
        # Polling: the stdlib has no portable file-watch API and a device drops files seconds apart.
        while True:
            files = self._ready_files()
            while files:
                # Read no more than the intake has room for: a backlog of files (the node was down)
                # must not be loaded into memory at once, nor block the loop while it is read.
                room = max(1, self._queue.maxsize - self._queue.qsize())
                chunk, files = files[:room], files[room:]
                await self._queue.put_many([self._read(file) for file in chunk])
            await asyncio.sleep(self.poll_s)

    def _ready_files(self) -> list[Path]:
        files = [p for p in self.path.iterdir() if p.is_file() and p.name not in self._seen]
        files = [p for p in files if not p.name.startswith(".")]  # partially written files are hidden
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))

    def _read(self, file: Path) -> InputItem:
        self._seen.add(file.name)
        now = asyncio.get_running_loop().time()
        item = InputItem(self._ids.next(), None, now, source_ref=f"file:{file.name}", on_done=self._finish)
        if file.suffix != ".npy":
            item.error = InputRejected("undecodable", f"{file.name}: only .npy files are read")
            return item
        try:
            item.array = np.load(file, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            item.error = InputRejected("undecodable", f"{file.name}: {exc}")
        return item

    def _finish(self, item: InputItem, ok: bool) -> None:
        name = (item.source_ref or "").removeprefix("file:")
        src = self.path / name
        dest = self.path / ("done" if ok else "failed") / name
        try:
            shutil.move(src, dest)
            if not ok and item.error is not None:
                dest.with_name(dest.name + ".reason.txt").write_text(str(item.error) + "\n")
        except OSError as exc:
            log.error("cannot move %s to %s: %s", src, dest.parent, exc)
        self._seen.discard(name)


def describe(config: SourceConfig) -> str:
    if config.kind == "directory":
        return f"directory {config.path}"
    if config.kind == "replay":
        return f"replay of digits at {config.rate_hz}/s drift={config.drift}:{config.drift_strength}"
    return "mqtt input topic"


__all__ = ["DirectorySource", "InputIds", "MqttInputSource", "Source", "describe"]
