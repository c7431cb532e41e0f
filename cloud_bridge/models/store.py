"""The model store: content-addressed ONNX artifacts (`root/{sha256}.onnx`) plus a `models` registry table.

`add` validates a file by loading it as a classifier (common/onnx.py: a file that is not ONNX, or
not one input fixed but for the batch and one row of class scores, is refused, naming the file) and
reads what devices and rollouts need from its ModelCard (labels, input shape, reference class mix;
schemas/modelcard.py gives the defaults). A name+version is immutable: registering it again with
other bytes is refused, with the same bytes it is a no-op. Several name+versions may share one artifact.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from cloud_bridge.errors import ModelStoreError
from cloud_bridge.registry import ModelRow, Registry
from common.files import copy_atomic
from common.onnx import load_model
from schemas.messages import ModelRef
from schemas.modelcard import ModelCard

log = logging.getLogger(__name__)

_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_VERSION_RE = r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$"


@dataclass(frozen=True)
class ModelRecord:
    name: str
    version: str
    sha256: str
    size: int
    path: Path
    labels: tuple[str, ...]
    input_shape: tuple[int, ...]
    reference_mix: dict[str, float]
    added_at: float

    @property
    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version, sha256=self.sha256)


@dataclass(frozen=True)
class _Inspected:
    sha256: str
    size: int
    card: ModelCard
    input_shape: tuple[int, ...]


def _inspect(path: Path) -> _Inspected:
    """Hash the file and load it as a classifier (common/onnx.py says what is refused, and why)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelStoreError(f"cannot read model file {path}: {exc}") from None
    model = load_model(path, data=data, error=ModelStoreError)
    return _Inspected(hashlib.sha256(data).hexdigest(), len(data), model.card, model.signature.input_shape)


def _record(row: ModelRow) -> ModelRecord:
    return ModelRecord(
        name=row.name,
        version=row.version,
        sha256=row.sha256,
        size=row.size,
        path=Path(row.path),
        labels=tuple(row.labels),
        input_shape=tuple(row.input_shape),
        reference_mix=dict(row.reference_mix),
        added_at=row.added_at,
    )


class ModelStore:
    """Artifacts under `root`, their metadata in the registry's `models` table."""

    def __init__(self, root: Path, registry: Registry) -> None:
        # Absolute: the table stores artifact paths, and the CLI may run from another directory.
        self.root = Path(root).resolve()
        self.registry = registry

    def artifact_path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.onnx"

    async def add(
        self,
        path: Path,
        name: str | None = None,
        version: str | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> ModelRecord:
        """Validate, copy into the store and register `path`; name/version default to its metadata.

        `warn` hears about likely mistakes that are still allowed: a version other than the one the
        file declares, and a file already registered under another name or version (an "update" to
        identical bytes)."""
        path = Path(path)
        inspected = await asyncio.to_thread(_inspect, path)
        card = inspected.card
        declared = card.version if card.declares("model_version") else None
        name = name or card.name
        version = version or declared
        if not version:
            raise ModelStoreError(f"{path} has no 'model_version' in its metadata: pass --version")
        _check_ref(name, version)
        if warn is not None:
            if declared and declared != version:
                warn(f"{path.name} declares model_version {declared}; registering it as {version}")
            for other in await self._select(ModelRow.sha256 == inspected.sha256):
                if (other.name, other.version) != (name, version):
                    warn(
                        f"{path.name} is byte for byte {other.name} {other.version} (sha256 {other.sha256[:12]}…): "
                        f"devices updated to {name} {version} would run the same model"
                    )
        record = ModelRecord(
            name=name,
            version=version,
            sha256=inspected.sha256,
            size=inspected.size,
            path=self.artifact_path(inspected.sha256),
            labels=card.labels,
            input_shape=inspected.input_shape,
            reference_mix=dict(card.reference_class_mix or {}),
            added_at=time.time(),
        )
        existing = await self._find(name, version)
        if existing is not None:
            return self._same_or_refuse(existing, record, path)
        if not record.path.exists():
            await asyncio.to_thread(self._copy_in, path, record.path)
        try:
            await self._insert(record)
        except IntegrityError:
            # Another process registered the same name+version between our read and insert.
            existing = await self._find(name, version)
            assert existing is not None
            return self._same_or_refuse(existing, record, path)
        log.info("model added name=%s version=%s sha256=%s size=%d", name, version, record.sha256[:12], record.size)
        return record

    def _copy_in(self, path: Path, dest: Path) -> None:
        """Copy into place atomically: a reader of the store never sees a partial artifact."""
        self.root.mkdir(parents=True, exist_ok=True)
        copy_atomic(path, dest)

    @staticmethod
    def _same_or_refuse(existing: ModelRecord, record: ModelRecord, path: Path) -> ModelRecord:
        if existing.sha256 != record.sha256:
            raise ModelStoreError(
                f"model {record.name} {record.version} is already registered with sha256 {existing.sha256[:12]}…; "
                f"{path} has {record.sha256[:12]}…: a version is immutable, register it under a new --version"
            )
        return existing

    async def _insert(self, record: ModelRecord) -> None:
        async with self.registry.engine.begin() as conn:
            await conn.execute(
                insert(ModelRow).values(
                    name=record.name,
                    version=record.version,
                    sha256=record.sha256,
                    size=record.size,
                    path=str(record.path),
                    labels=list(record.labels),
                    input_shape=list(record.input_shape),
                    reference_mix=record.reference_mix,
                    added_at=record.added_at,
                )
            )

    async def _select(self, *where: Any) -> list[ModelRecord]:
        async with self.registry.engine.connect() as conn:
            result = await conn.execute(select(ModelRow.__table__).where(*where))
            return [_record(ModelRow(**dict(row._mapping))) for row in result]

    async def _find(self, name: str, version: str) -> ModelRecord | None:
        found = await self._select(ModelRow.name == name, ModelRow.version == version)
        return found[0] if found else None

    async def get(self, name: str, version: str) -> ModelRecord:
        record = await self._find(name, version)
        if record is None:
            raise ModelStoreError(
                f"model {name} {version} is not registered: add it with `cloud-bridge models add PATH`"
            )
        return record

    async def get_by_sha(self, sha256: str) -> ModelRecord | None:
        found = await self._select(ModelRow.sha256 == sha256)
        return min(found, key=lambda r: r.added_at) if found else None

    async def list(self) -> list[ModelRecord]:
        records = await self._select()
        return sorted(records, key=lambda r: (r.name, r.added_at))


def _check_ref(name: str, version: str) -> None:
    if not re.match(_NAME_RE, name):
        raise ModelStoreError(f"model name {name!r} must match {_NAME_RE}")
    if not re.match(_VERSION_RE, version):
        raise ModelStoreError(f"model version {version!r} must match {_VERSION_RE}")
