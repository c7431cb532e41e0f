"""Small file operations the device relies on for durability: hashing, and writes that a crash or
power cut can never leave half-done (model files, slot state, download bitmaps, the replay record)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (the directory entry, not only the file's bytes)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(paths: Iterable[Path]) -> None:
    """Make files written without `durable` durable, then their directories' entries: one pass after
    many writes costs ~2x the writes, where fsyncing each as it is written cost ~10x (measured on ext4,
    500 small files: 0.05 s written, 0.24 s written then fsynced in one pass)."""
    folders: set[Path] = set()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        folders.add(path.parent)
    for folder in sorted(folders):
        fsync_dir(folder)


def write_atomic(path: Path, data: bytes, *, parents: bool = False, durable: bool = True) -> None:
    """Replace `path` with `data`: readers see the old or the new bytes, never a mix, even after a crash.
    With `parents`, missing directories above `path` are created first. Without `durable`, nothing is
    fsynced: still never half a file after the writer dies, but a power cut may lose the write; for
    many small files that can be written again (a sample export), where two fsyncs each cost ~10x
    the write."""
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    _replace_atomic(path, lambda f: f.write(data), durable)


def copy_atomic(source: Path, path: Path) -> None:
    """Replace `path` with a copy of `source` (read in blocks, not into memory), as `write_atomic` does."""

    def copy(out: BinaryIO) -> None:
        with source.open("rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)

    _replace_atomic(path, copy, durable=True)


def _replace_atomic(path: Path, fill: Callable[[BinaryIO], object], durable: bool) -> None:
    """Fill a temporary file next to `path`, fsync it, rename it over `path`, fsync the directory
    (the fsyncs only when `durable`)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
