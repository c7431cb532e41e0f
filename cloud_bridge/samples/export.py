"""Export archived samples for labelers: one .npy (+ .png for image-shaped inputs) and one manifest line each.

Layout of an export directory (documented in README "Samples for labelers"):

    manifest.jsonl          one JSON object per sample, appended in archive order
    inputs/{msg_id}.npy     the input tensor exactly as the device sent it (dtype and shape kept)
    inputs/{msg_id}.png     the same input as a picture, when it is image-shaped (cloud_bridge/samples/images.py)
    label-studio.json       with --format label-studio: the tasks this run added to the manifest (new
                            since the last export), so importing each file never re-imports a task
    .cursor.json            where `--since last` resumes, per filter set

Re-running is idempotent: a msg_id already in the manifest is skipped, files are written to a temp
name and renamed (an interrupted export never leaves a truncated file behind), and a manifest line
is appended only after its files exist. Rows are read in keyset-paginated pages so a large archive
is never held in memory or in one long read transaction.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, Select, String, cast, func, select, tuple_

from cloud_bridge.errors import ExportError
from cloud_bridge.registry import Registry, SampleRow
from cloud_bridge.samples.images import encode_png, image_of, zoom
from common.files import fsync_files, write_atomic
from schemas.messages import Tensor
from schemas.tensor import decode_tensor

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
INPUTS = "inputs"
LABEL_STUDIO = "label-studio.json"
CURSOR = ".cursor.json"
PAGE = 500
PROGRESS_EVERY_S = 1.0

ProgressFn = Callable[["ExportStats"], None]


@dataclass(frozen=True)
class ExportFilter:
    """Which samples to export. `since`/`until` bound the device timestamp; `after` is a cursor."""

    since: float | None = None
    until: float | None = None
    fleet: str | None = None
    device: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    reason: str | None = None
    after: tuple[float, str] | None = None

    def cursor_key(self) -> str:
        """The cursor is kept per filter set: a device-only export must not advance the fleet's."""
        parts = (self.fleet, self.device, self.model_name, self.model_version, self.reason)
        return "|".join(p or "*" for p in parts)

    def where(self) -> list[ColumnElement[bool]]:
        s = SampleRow
        clauses: list[ColumnElement[bool]] = []
        if self.since is not None:
            clauses.append(s.ts >= self.since)
        if self.until is not None:
            clauses.append(s.ts < self.until)
        for column, value in (
            (s.fleet_id, self.fleet),
            (s.device_id, self.device),
            (s.model_name, self.model_name),
            (s.model_version, self.model_version),
        ):
            if value is not None:
                clauses.append(column == value)
        if self.reason is not None:
            # `reasons` is a JSON list of fixed words: its text contains "entropy" with the quotes iff listed.
            clauses.append(cast(s.reasons, String).like(f'%"{self.reason}"%'))
        if self.after is not None:
            clauses.append(tuple_(arrival_key(), s.msg_id) > tuple_(self.after[0], self.after[1]))
        return clauses


def arrival_key() -> ColumnElement[float]:
    """Archive order: when the bridge stored the row (rows from before that column: the device ts)."""
    return func.coalesce(SampleRow.received_at, SampleRow.ts)


@dataclass
class ExportStats:
    total: int = 0
    written: int = 0
    skipped: int = 0
    images: int = 0
    cursor: tuple[float, str] | None = None
    tasks: int = 0  # Label Studio tasks written (the samples new in this run)
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class ExportOptions:
    out_dir: Path
    limit: int | None = None
    png_zoom: int = 0
    label_studio: bool = False
    image_url_prefix: str = ""


def page_query(flt: ExportFilter, after: tuple[float, str] | None, size: int) -> Select[Any]:
    key = arrival_key()
    clauses = flt.where()
    if after is not None:
        clauses.append(tuple_(key, SampleRow.msg_id) > tuple_(after[0], after[1]))
    columns = [c for c in SampleRow.__table__.c]
    return select(*columns, key.label("arrival")).where(*clauses).order_by(key, SampleRow.msg_id).limit(size)


async def count_matching(registry: Registry, flt: ExportFilter) -> int:
    async with registry.engine.connect() as conn:
        result = await conn.execute(select(func.count()).select_from(SampleRow).where(*flt.where()))
        return int(result.scalar_one())


async def export_samples(
    registry: Registry, flt: ExportFilter, options: ExportOptions, progress: ProgressFn | None = None
) -> ExportStats:
    """Write every matching sample not yet in the manifest; returns counts and the last row's cursor."""
    writer = await asyncio.to_thread(ExportWriter.open, options)
    stats = ExportStats()
    matching = await count_matching(registry, flt)
    stats.total = matching if options.limit is None else min(matching, options.limit)
    last_report = time.monotonic()
    after: tuple[float, str] | None = None
    while options.limit is None or stats.written + stats.skipped < options.limit:
        room = PAGE if options.limit is None else min(PAGE, options.limit - stats.written - stats.skipped)
        async with registry.engine.connect() as conn:
            rows = [dict(r._mapping) for r in await conn.execute(page_query(flt, after, room))]
        if not rows:
            break
        written, images = await asyncio.to_thread(writer.write_page, rows)
        stats.written += written
        stats.images += images
        stats.skipped += len(rows) - written
        after = stats.cursor = (float(rows[-1]["arrival"]), str(rows[-1]["msg_id"]))
        if progress is not None and time.monotonic() - last_report >= PROGRESS_EVERY_S:
            progress(stats)
            last_report = time.monotonic()
    if options.label_studio:
        stats.tasks = await asyncio.to_thread(writer.write_label_studio)
        if not options.image_url_prefix and stats.images:
            stats.warnings.append(
                "label-studio.json names images by paths relative to the export directory, which Label Studio "
                "cannot open: pass --image-url-prefix (e.g. '/data/local-files/?d=EXPORT_DIR/' with local "
                "file serving, or the URL the directory is served at)"
            )
    return stats


async def export_resuming(
    registry: Registry,
    flt: ExportFilter,
    options: ExportOptions,
    *,
    resume: bool,
    progress: ProgressFn | None = None,
) -> ExportStats:
    """`export_samples`, and with `resume` from where the last export of the same filter set to the same
    directory stopped (its cursor, moved on afterwards); a file that cannot be written raises ExportError."""
    out = options.out_dir
    try:
        if resume:
            cursor = await asyncio.to_thread(read_cursor, out, flt) if out.is_dir() else None
            flt = dataclasses.replace(flt, after=cursor)
        stats = await export_samples(registry, flt, options, progress)
        if resume and stats.cursor is not None:
            await asyncio.to_thread(write_cursor, out, flt, stats.cursor)
    except OSError as exc:
        raise ExportError(f"cannot write the export to {out}: {exc}") from exc
    return stats


class ExportWriter:
    """The files of one export directory (runs in a worker thread: plain blocking I/O)."""

    def __init__(self, options: ExportOptions, exported: set[str]) -> None:
        self.options = options
        self.exported = exported
        self.inputs = options.out_dir / INPUTS
        self.new_entries: list[dict[str, Any]] = []  # manifest entries this run wrote

    @classmethod
    def open(cls, options: ExportOptions) -> ExportWriter:
        out = options.out_dir
        if out.exists() and not out.is_dir():
            raise ExportError(f"--out {out} exists and is not a directory: choose a directory")
        (out / INPUTS).mkdir(parents=True, exist_ok=True)
        return cls(options, {entry["msg_id"] for entry in read_manifest(out / MANIFEST)})

    def write_page(self, rows: list[dict[str, Any]]) -> tuple[int, int]:
        """Files for every new row, then their manifest lines; returns (new rows, PNGs among them)."""
        lines: list[str] = []
        images = 0
        for row in rows:
            if row["msg_id"] in self.exported:
                continue
            entry = self._write_files(row)
            self.new_entries.append(entry)
            images += entry["png"] is not None
            lines.append(json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n")
            self.exported.add(row["msg_id"])
        if lines:
            # A manifest line names files a labeler will open: they are on disk before it is.
            out = self.options.out_dir
            fsync_files(
                out / name
                for entry in self.new_entries[len(self.new_entries) - len(lines) :]
                for name in (entry["npy"], entry["png"])
                if name is not None
            )
            with (self.options.out_dir / MANIFEST).open("a", encoding="utf-8") as manifest:
                manifest.writelines(lines)
                manifest.flush()
                os.fsync(manifest.fileno())
        return len(lines), images

    def _write_files(self, row: Mapping[str, Any]) -> dict[str, Any]:
        msg_id = row["msg_id"]
        tensor = Tensor(dtype=row["dtype"], shape=list(row["shape"]), data=bytes(row["tensor"]))
        array = decode_tensor(tensor, field=f"samples[{msg_id}].tensor", allow_nonfinite=True)
        npy = f"{INPUTS}/{msg_id}.npy"
        _write_new(self.options.out_dir / npy, _npy_bytes(array))
        png: str | None = None
        picture = image_of(array)
        if picture is not None:
            png = f"{INPUTS}/{msg_id}.png"
            _write_new(self.options.out_dir / png, encode_png(zoom(picture, self.options.png_zoom)))
        return manifest_entry(row, npy, png)

    def write_label_studio(self) -> int:
        """label-studio.json with the tasks of this run's new samples only (an earlier file was imported
        already, or will be: rewriting every task made each import re-import the old ones)."""
        tasks = [label_studio_task(entry, self.options.image_url_prefix) for entry in self.new_entries]
        write_atomic(self.options.out_dir / LABEL_STUDIO, json.dumps(tasks, ensure_ascii=False).encode())
        return len(tasks)


def _write_new(path: Path, data: bytes) -> None:
    """Write a sample's file atomically (common/files.py): a reader, or the next run, never sees half
    of it. Not fsynced here: one at a time that made an export ~10x slower; the page's files are
    fsynced together before its manifest lines (`fsync_files`). One already there is left as it is:
    same msg_id, same bytes, from a run interrupted before its manifest line."""
    if not path.exists():
        write_atomic(path, data, durable=False)


def _npy_bytes(array: np.ndarray[Any, Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def manifest_entry(row: Mapping[str, Any], npy: str, png: str | None) -> dict[str, Any]:
    """One manifest line (README "Samples for labelers" documents every field)."""
    return {
        "msg_id": row["msg_id"],
        "npy": npy,
        "png": png,
        "fleet_id": row["fleet_id"],
        "device_id": row["device_id"],
        "model": {"name": row["model_name"], "version": row["model_version"], "sha256": row["model_sha256"]},
        "inference_id": row["inference_id"],
        "dtype": row["dtype"],
        "shape": list(row["shape"]),
        "predicted": row["predicted"],
        "topk": row["topk"],
        "entropy": row["entropy"],
        "margin": row["margin"],
        "reasons": row["reasons"],
        "truth": row["truth"],
        "source_ref": row["source_ref"],
        "ts": row["ts"],
        "time": iso(row["ts"]),
        "received_at": row["received_at"],
    }


def label_studio_task(entry: Mapping[str, Any], url_prefix: str) -> dict[str, Any]:
    """A Label Studio task: `$image` for an <Image> tag, the edge model's answer as a pre-annotation
    on a <Choices name="label" toName="image"> tag, and the sample's identity under `meta`."""
    top = entry["topk"][0] if entry["topk"] else {"prob": None}
    model = entry["model"]
    return {
        "data": {
            "image": url_prefix + entry["png"] if entry["png"] else None,
            "npy": url_prefix + entry["npy"],
            "msg_id": entry["msg_id"],
            "device_id": entry["device_id"],
            "reasons": ",".join(entry["reasons"]),
            "truth": entry["truth"],
        },
        "meta": {k: entry[k] for k in ("msg_id", "fleet_id", "device_id", "inference_id", "source_ref", "time")},
        "predictions": [
            {
                "model_version": f"{model['name']}@{model['version']}",
                "score": top["prob"],
                "result": [
                    {
                        "from_name": "label",
                        "to_name": "image",
                        "type": "choices",
                        "value": {"choices": [entry["predicted"]]},
                    }
                ],
            }
        ],
    }


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Entries of an existing manifest; a last line cut short by a crash is dropped (and truncated away)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("manifest %s ends with a partial line (interrupted export): truncating it", path)
        with path.open("r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    entries: list[dict[str, Any]] = []
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ExportError(
                f"{path} line {number} is not JSON ({exc}): move the file away or fix the line, then re-run"
            ) from None
    return entries


def read_cursor(out_dir: Path, flt: ExportFilter) -> tuple[float, str] | None:
    cursors = _read_cursors(out_dir)
    value = cursors.get(flt.cursor_key())
    return None if value is None else (float(value["arrival"]), str(value["msg_id"]))


def write_cursor(out_dir: Path, flt: ExportFilter, cursor: tuple[float, str]) -> None:
    cursors = _read_cursors(out_dir)
    cursors[flt.cursor_key()] = {"arrival": cursor[0], "msg_id": cursor[1], "updated": iso(time.time())}
    write_atomic(out_dir / CURSOR, json.dumps(cursors, indent=1).encode())


def _read_cursors(out_dir: Path) -> dict[str, Any]:
    path = out_dir / CURSOR
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise ExportError(
            f"{path} is not JSON ({exc}): delete it to export everything again with --since last"
        ) from None
    if not isinstance(loaded, dict):
        raise ExportError(f"{path} is not a JSON object: delete it to export everything again with --since last")
    return loaded


def summarize(stats: ExportStats) -> str:
    elapsed = max(1e-9, time.monotonic() - stats.started)
    return (
        f"{stats.written + stats.skipped}/{stats.total} samples: {stats.written} written "
        f"({stats.images} with PNG), {stats.skipped} already exported, {stats.written / elapsed:.0f}/s"
    )
