"""Binary deltas between model artifacts (bsdiff4), for updates over metered links.

When the bridge sends a device an update and knows the model the device runs (the registry's
devices.model_sha256, from its status and telemetry) and has that model in its store, it offers a
patch from it to the new model if the patch is at most `delta_max_fraction` of the model: a
fine-tuned head or changed metadata is a few KB where the model is megabytes. The device fetches the
patch like a model (same chunks, requested by the patch's sha256), applies it to its own copy and
checks the result against the model's sha256 in the signed command; if anything fails it fetches
the whole model. Nothing about the patch has to be trusted: only the patched bytes are.

Patches live next to the artifacts: `{root}/deltas/{sha256}.bsdiff`, and per (base, target) pair a
small index `{base}-{target}.json` saying which patch it is, or that none is worth sending (so
bsdiff, which takes seconds and ~17x the model's size in memory on a large model, runs once per
pair).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import bsdiff4

from cloud_bridge.models.store import ModelRecord, ModelStore
from cloud_bridge.registry import Registry
from common.files import write_atomic

log = logging.getLogger(__name__)

DEFAULT_MAX_FRACTION = 0.5


@dataclass(frozen=True)
class DeltaArtifact:
    """A patch file served like a model artifact (`sha256`, `size`, `path`)."""

    sha256: str
    size: int
    path: Path
    base_sha256: str = ""
    target_sha256: str = ""


class DeltaStore:
    """Patches between artifacts of one ModelStore, computed on first use and kept on disk."""

    def __init__(self, store: ModelStore, max_fraction: float = DEFAULT_MAX_FRACTION) -> None:
        self.root = store.root / "deltas"
        self.max_fraction = max_fraction
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def artifact_path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.bsdiff"

    def find(self, sha256: str) -> DeltaArtifact | None:
        """The patch with this sha256, for the chunk server (None: no such patch here)."""
        path = self.artifact_path(sha256)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        return DeltaArtifact(sha256=sha256, size=size, path=path)

    async def delta(self, base: ModelRecord, target: ModelRecord) -> DeltaArtifact | None:
        """The patch from `base` to `target` if it is worth sending (computed once per pair)."""
        if self.max_fraction <= 0 or base.sha256 == target.sha256:
            return None
        key = (base.sha256, target.sha256)
        async with self._locks.setdefault(key, asyncio.Lock()):
            return await asyncio.to_thread(self._delta, base, target)

    def _delta(self, base: ModelRecord, target: ModelRecord) -> DeltaArtifact | None:
        self.root.mkdir(parents=True, exist_ok=True)
        index = self.root / f"{base.sha256}-{target.sha256}.json"
        try:
            known = json.loads(index.read_text())
            if known.get("sha256") is None:
                return None
            found = self.find(known["sha256"])
            if found is not None:
                return DeltaArtifact(found.sha256, found.size, found.path, base.sha256, target.sha256)
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable delta index %s (%s): computing the patch again", index, exc)
        patch = bsdiff4.diff(base.path.read_bytes(), target.path.read_bytes())
        if len(patch) > self.max_fraction * target.size:
            log.info(
                "no delta %s -> %s: the patch is %d bytes, the model %d",
                base.sha256[:12],
                target.sha256[:12],
                len(patch),
                target.size,
            )
            write_atomic(index, json.dumps({"sha256": None, "size": len(patch)}).encode())
            return None
        sha = hashlib.sha256(patch).hexdigest()
        path = self.artifact_path(sha)
        write_atomic(path, patch)
        write_atomic(index, json.dumps({"sha256": sha, "size": len(patch)}).encode())
        log.info(
            "delta %s -> %s: %d bytes for a %d-byte model",
            base.sha256[:12],
            target.sha256[:12],
            len(patch),
            target.size,
        )
        return DeltaArtifact(sha, len(patch), path, base.sha256, target.sha256)


async def delta_for_device(
    deltas: DeltaStore, models: ModelStore, registry: Registry, fleet_id: str, device_id: str, target: ModelRecord
) -> DeltaArtifact | None:
    """The patch to offer a device for `target`: from the model the registry says it runs, if the
    store has that model and the patch is worth it."""
    return await delta_from(deltas, models, await registry.device_model(fleet_id, device_id), target)


async def delta_from(
    deltas: DeltaStore, models: ModelStore, current: str | None, target: ModelRecord
) -> DeltaArtifact | None:
    """The patch to offer a device running the model of sha256 `current` (None: unknown) for `target`."""
    if current is None or current == target.sha256:
        return None
    base = await models.get_by_sha(current)
    if base is None:
        return None  # the device runs a model this store never had: it fetches the whole model
    return await deltas.delta(base, target)
