"""The spill: lines the writer could not send yet, on disk, bounded in bytes, oldest dropped first.

A directory of segment files `000000000001.lp`, `000000000002.lp`, ... of whole lines, each up to
`segment_bytes` (1/16 of the bound, 4 KiB to 16 MiB): appends go to the newest, replay reads the
oldest. Before an append would take the files past `max_bytes`, whole oldest segments are deleted
and their unsent lines counted in `dropped`; the bound therefore always holds, and a drop costs a file
deletion, never a rewrite. Policy: when the TSDB stays unreachable (or refuses the destination) for
long, the newest `max_bytes` of lines survive: a dashboard needs the recent past first.

Every append is fsynced. Replay progress lives in memory only: after a crash the oldest segment is
sent again from its start, which rewrites the same points (same timestamps). The single file of
earlier versions (`<dir>.lp`) is adopted as the oldest segment.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SUFFIX = ".lp"
_MIN_SEGMENT = 4096
_MAX_SEGMENT = 16 << 20


@dataclass
class _Segment:
    seq: int
    path: Path
    size: int  # bytes in the file
    lines: int  # lines in the file
    read_at: int = 0  # bytes already sent
    read_lines: int = 0

    @property
    def unread(self) -> int:
        return self.lines - self.read_lines


@dataclass(frozen=True)
class Chunk:
    """Lines read from the oldest segment: `consume()` once written (or refused for good), else `abandon()`."""

    lines: list[str]
    seq: int
    start: int
    end: int
    count: int  # lines read, including any empty one


class Spill:
    def __init__(self, directory: Path, max_bytes: int, *, legacy_file: Path | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError(f"spill max_bytes must be > 0, not {max_bytes}")
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = min(max(max_bytes // 16, _MIN_SEGMENT), _MAX_SEGMENT)
        self.dropped = 0  # lines deleted unsent to keep the bound
        self._segments: deque[_Segment] = deque()
        self._inflight: Chunk | None = None
        # Appends go to the segment this writer created last, never to one found on disk: a crash may
        # have torn its last line, and a line appended to it would be torn too.
        self._open_seq: int | None = None
        self._load(legacy_file)

    @property
    def lines(self) -> int:
        """Lines not yet sent."""
        return sum(s.unread for s in self._segments)

    @property
    def disk_bytes(self) -> int:
        """Bytes the segment files take on disk (what `max_bytes` bounds)."""
        return sum(s.size for s in self._segments)

    def __bool__(self) -> bool:
        return bool(self._segments)

    def _load(self, legacy_file: Path | None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if legacy_file is not None and legacy_file.is_file():
            target = self.directory / f"{0:012d}{_SUFFIX}"
            if target.exists():
                log.warning("tsdb spill: %s left in place, %s exists", legacy_file, target)
            else:
                legacy_file.replace(target)
                log.info("tsdb spill: adopted %s as %s", legacy_file, target)
        for path in sorted(self.directory.glob(f"*{_SUFFIX}")):
            if path.stem.isdigit():
                size, lines = _count(path)
                self._segments.append(_Segment(int(path.stem), path, size, lines))
        self._next_seq = self._segments[-1].seq + 1 if self._segments else 1
        if self._segments:
            log.info("tsdb spill found lines=%d bytes=%d dir=%s", self.lines, self.disk_bytes, self.directory)

    def append(self, lines: Sequence[str]) -> int:
        """Store `lines` after everything spilled so far; returns how many lines the bound dropped."""
        encoded = [f"{ln}\n".encode() for ln in lines]
        size = sum(len(e) for e in encoded)
        dropped = 0
        while encoded and size > self.max_bytes:  # more than the whole bound: keep the newest
            size -= len(encoded[0])
            del encoded[0]
            dropped += 1
        while self._segments and self.disk_bytes + size > self.max_bytes:
            dropped += self._drop_oldest()
        self._write(encoded)
        self.dropped += dropped
        if dropped:
            log.warning("tsdb spill full: dropped the oldest lines=%d max_bytes=%d", dropped, self.max_bytes)
        return dropped

    def _drop_oldest(self) -> int:
        seg = self._segments.popleft()
        seg.path.unlink(missing_ok=True)
        unsent = seg.unread
        if self._inflight is not None and self._inflight.seq == seg.seq:
            unsent -= self._inflight.count  # counted by abandon() if its send fails
        return unsent

    def _write(self, encoded: list[bytes]) -> None:
        while encoded:
            seg = self._segments[-1] if self._segments else None
            if seg is None or seg.size >= self.segment_bytes or seg.seq != self._open_seq:
                # Numbers are never reused (a chunk in flight names its segment by number).
                seq = self._next_seq
                self._next_seq += 1
                seg = _Segment(seq, self.directory / f"{seq:012d}{_SUFFIX}", 0, 0)
                self._segments.append(seg)
                self._open_seq = seq
            room, take = self.segment_bytes - seg.size, 0
            while take < len(encoded) and (take == 0 or len(encoded[take]) <= room):
                room -= len(encoded[take])
                take += 1
            data = b"".join(encoded[:take])
            new_file = not seg.path.exists()
            with seg.path.open("ab") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if new_file:
                _fsync_dir(self.directory)
            seg.size += len(data)
            seg.lines += take
            del encoded[:take]

    def read(self, max_lines: int) -> Chunk | None:
        """Up to `max_lines` unsent lines from the oldest segment (None when the spill is empty)."""
        if not self._segments:
            return None
        seg = self._segments[0]
        lines: list[str] = []
        count, pos = 0, seg.read_at
        with seg.path.open("rb") as fh:
            fh.seek(pos)
            while count < max_lines and pos < seg.size:
                raw = fh.readline()
                if not raw:
                    break
                pos += len(raw)
                count += 1
                text = raw.rstrip(b"\n").decode("utf-8", errors="replace")
                if text:
                    lines.append(text)
        self._inflight = Chunk(lines, seg.seq, seg.read_at, pos, count)
        return self._inflight

    def consume(self, chunk: Chunk) -> None:
        """The chunk's lines are done with: advance past them (a segment read to its end is deleted)."""
        self._inflight = None
        seg = self._segments[0] if self._segments else None
        if seg is None or seg.seq != chunk.seq or seg.read_at != chunk.start:
            return  # its segment was dropped for the bound meanwhile: nothing left to advance
        seg.read_at, seg.read_lines = chunk.end, seg.read_lines + chunk.count
        if seg.read_at >= seg.size:
            self._segments.popleft()
            seg.path.unlink(missing_ok=True)

    def abandon(self, chunk: Chunk) -> None:
        """The chunk could not be sent: it stays to be read again, unless the bound dropped its segment."""
        self._inflight = None
        if not any(s.seq == chunk.seq for s in self._segments):
            self.dropped += chunk.count


def _count(path: Path) -> tuple[int, int]:
    """(bytes, lines) of a segment; a torn last line without its newline counts as a line."""
    size, newlines, last = 0, 0, b"\n"
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            size += len(block)
            newlines += block.count(b"\n")
            last = block[-1:]
    return size, newlines + (last != b"\n")


def _fsync_dir(directory: Path) -> None:
    # A new file's directory entry is durable only once the directory itself is synced.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
