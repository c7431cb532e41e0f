"""The staging of one download: a part file written chunk by chunk, and the persisted bitmap of the
chunks it durably holds.

    state_dir/staging/{sha256}.part       chunks written at their offsets as they arrive
    state_dir/staging/{sha256}.bitmap     which chunks of .part are durably written (JSON, atomic)

A chunk's bit is set only after its bytes are fsynced, so after a cut or a restart the download
asks only for what is missing; bytes without a bitmap vouching for them are never trusted. The
finished file must have the announced size and sha256 before it moves into the content store.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from common.files import file_sha256, fsync_dir, write_atomic
from schemas.messages import ModelUpdate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Artifact:
    """What one download fetches: an update's model, or the patch it offers (ModelDelta)."""

    sha256: str
    size: int
    chunk_size: int
    chunks: int  # as announced (checked against size and chunk_size)
    chunk_topic: str

    @classmethod
    def model(cls, update: ModelUpdate) -> Artifact:
        return cls(update.model.sha256, update.size, update.chunk_size, update.chunks, update.chunk_topic)

    @classmethod
    def patch(cls, update: ModelUpdate) -> Artifact:
        assert update.delta is not None
        d = update.delta
        return cls(d.sha256, d.size, update.chunk_size, d.chunks, d.chunk_topic)

    @property
    def expected_chunks(self) -> int:
        return max(1, math.ceil(self.size / self.chunk_size))


class Staging:
    """The part file and its bitmap for one artifact. Blocking I/O: call from a worker thread."""

    def __init__(self, directory: Path, artifact: Artifact) -> None:
        sha = artifact.sha256
        self.artifact = artifact
        self.chunks = artifact.expected_chunks
        self.part = directory / f"{sha}.part"
        self.bitmap_path = directory / f"{sha}.bitmap"
        self.have = bytearray((self.chunks + 7) // 8)
        self._header = {"sha256": sha, "size": artifact.size, "chunk_size": artifact.chunk_size, "chunks": self.chunks}

    def load(self) -> int:
        """Resume from a bitmap that describes this same artifact; returns how many chunks it holds."""
        self.part.parent.mkdir(parents=True, exist_ok=True)
        resumed = False
        try:
            saved = json.loads(self.bitmap_path.read_text(encoding="utf-8"))
            have = base64.b64decode(saved["have"])
            same = {k: saved.get(k) for k in self._header} == self._header and len(have) == len(self.have)
            if same and self.part.exists():
                self.have[:] = have
                resumed = True
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            log.warning("unreadable download bitmap %s (%s): starting that model again", self.bitmap_path, exc)
        if not resumed:
            # Bytes without a bitmap vouching for them are not trusted: start from an empty file.
            self.have[:] = bytes(len(self.have))
            self.part.write_bytes(b"")
            self.bitmap_path.unlink(missing_ok=True)
        return self.count()

    def holds(self, index: int) -> bool:
        return bool(self.have[index >> 3] & (1 << (index & 7)))

    def count(self) -> int:
        return sum(bin(b).count("1") for b in self.have)

    def missing(self) -> list[int]:
        return [i for i in range(self.chunks) if not self.holds(i)]

    def write(self, chunks: list[tuple[int, bytes]]) -> None:
        """Write chunks at their offsets, fsync, then record them (a bit never covers unsynced data)."""
        fd = os.open(self.part, os.O_WRONLY)
        try:
            for index, data in chunks:
                os.pwrite(fd, data, index * self.artifact.chunk_size)
            os.fsync(fd)
        finally:
            os.close(fd)
        for index, _ in chunks:
            self.have[index >> 3] |= 1 << (index & 7)
        body = {**self._header, "have": base64.b64encode(bytes(self.have)).decode()}
        write_atomic(self.bitmap_path, json.dumps(body).encode())

    def finish(self, dest: Path) -> str | None:
        """Verify size and sha256, then move into the content store; else discard and say why."""
        size = self.part.stat().st_size
        if size != self.artifact.size:
            self.discard()
            return f"assembled {size} bytes, the command announced {self.artifact.size}"
        digest = file_sha256(self.part)
        if digest != self.artifact.sha256:
            self.discard()
            return f"assembled file has sha256 {digest}, the command announced {self.artifact.sha256}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.part, dest)
        fsync_dir(dest.parent)
        self.bitmap_path.unlink(missing_ok=True)
        return None

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.bitmap_path.unlink(missing_ok=True)
