"""Disk: whether a program can write in a directory, and how much room it has."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from common.checks.report import Finding, size

_MIB = 1024 * 1024


def probe_dir(name: str, path: Path, setting: str, *, need_bytes: int = 0) -> Finding:
    """Whether the program can write in `path` (created at start when missing: then its nearest
    existing parent must be writable), and whether the disk has `need_bytes` free."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return Finding(
            name, "fail", f"{path}: {existing} is a file, not a directory", f"point {setting} at a directory"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".check-") as probe:
            probe.write(b"check")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        who = f"uid {os.geteuid()}"
        return Finding(
            name,
            "fail",
            f"cannot write in {existing} ({exc.strerror or exc})",
            f"make {existing} writable for {who} (chmod/chown; `lsattr -d` shows an immutable flag), "
            f"or point {setting} elsewhere",
        )
    free = shutil.disk_usage(existing).free
    where = (
        f"{path} writable" if existing == path else f"{path} does not exist yet (made at start in {existing}: writable)"
    )
    if free < need_bytes:
        return Finding(
            name,
            "warn",
            f"{where}, {size(free)} free: less than the {size(need_bytes)} it may fill",
            f"free disk space on {existing}, or lower the bound",
        )
    if free < 16 * _MIB:
        return Finding(name, "warn", f"{where}, only {size(free)} free", f"free disk space on {existing}")
    return Finding(name, "ok", f"{where}, {size(free)} free")
