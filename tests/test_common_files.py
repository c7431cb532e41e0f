"""common/files.py: writes and copies that a crash never leaves half-done."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.files import copy_atomic, file_sha256, write_atomic


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, b"old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert _leftovers(tmp_path) == []


def test_copy_atomic_copies_in_blocks_and_a_failed_copy_keeps_the_old_file(tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    source.write_bytes(os.urandom(3 << 20 | 12345))  # several blocks and a partial one
    dest = tmp_path / "slot" / "copy.onnx"
    dest.parent.mkdir()
    dest.write_bytes(b"previous")
    copy_atomic(source, dest)
    assert file_sha256(dest) == file_sha256(source)
    with pytest.raises(FileNotFoundError):
        copy_atomic(tmp_path / "absent.onnx", dest)
    assert file_sha256(dest) == file_sha256(source)  # untouched by the failed copy
    assert _leftovers(dest.parent) == []


def test_only_a_durable_write_pays_for_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomic(tmp_path / "sample.npy", b"many small files", durable=False)
    assert synced == [] and (tmp_path / "sample.npy").read_bytes() == b"many small files"
    write_atomic(tmp_path / "state.json", b"{}")
    assert len(synced) == 2  # the file's bytes, then the directory entry
    assert _leftovers(tmp_path) == []
