"""The A/B model slots on disk: which slot is active, what each holds, and the switch on probation.

Layout under `{ota state_dir}/slots/`:

    state.json        which slot is active, what each slot holds, the previous slot, and the switch
                      still on probation (its command, boot attempts, the old model's baseline)
    A/{sha256}.onnx   the model of slot A (named by content, so a half-copied file is never it)
    B/{sha256}.onnx

Until the first install there is no state and the node runs the factory model (`[model] path`); the
first install copies it into slot A and installs into B. `state.json` is replaced atomically
(write, fsync, rename, fsync the directory), always *before* the pipeline switches, so a crash at
any point leaves a state that names a complete, verified file. What starts the node on a slot is
edge_node/ota/boot.py; what installs into one and switches, edge_node/ota/installer.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Literal

import msgspec

from common.files import copy_atomic, fsync_dir, write_atomic
from edge_node.errors import ModelLoadError, SlotError
from edge_node.inference.model import Classifier
from edge_node.ota.health import Baseline
from schemas import ModelRef

log = logging.getLogger(__name__)

SlotName = Literal["A", "B"]
SLOTS: tuple[SlotName, SlotName] = ("A", "B")
STATE_FILE = "state.json"
Loader = Callable[[Path], Classifier]


class SlotRecord(msgspec.Struct, frozen=True, kw_only=True):
    model: ModelRef
    file: str  # relative to the slots dir
    installed_at: float


class PendingSwitch(msgspec.Struct, frozen=True, kw_only=True):
    """A switch not yet confirmed by probation: what to ack, and where to go back to."""

    cmd_id: str
    rollout_id: str | None = None
    model: ModelRef
    slot: SlotName
    previous: SlotName
    switched_at: float
    boot_attempts: int = 0
    baseline: Baseline = msgspec.field(default_factory=Baseline)


class SlotState(msgspec.Struct, frozen=True, kw_only=True):
    active: SlotName
    slots: dict[SlotName, SlotRecord]
    previous: SlotName | None = None
    pending: PendingSwitch | None = None
    format: int = 1

    @property
    def standby(self) -> SlotName:
        return "B" if self.active == "A" else "A"


class SlotStore:
    """The slots directory: atomic state file, slot files named by sha256, staging and pruning."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_path = root / STATE_FILE

    def load(self) -> SlotState | None:
        """The persisted state, or None when there is none (factory model). A state file that does
        not decode is moved aside (so the node still starts, on the factory model) and logged."""
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:  # a path through a regular file, no permission: the node cannot run
            raise SlotError(
                f"cannot read the slot state {self.state_path}: {exc.strerror or exc}; fix: make [ota] state_dir "
                "(default: an ota dir next to the outbox) a writable directory"
            ) from exc
        try:
            state = msgspec.json.decode(raw, type=SlotState)
            if state.active not in state.slots:
                raise msgspec.ValidationError(f"active slot {state.active} has no record")
            return state
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            aside = self.state_path.with_name(f"{STATE_FILE}.corrupt-{int(time.time())}")
            self.state_path.replace(aside)
            log.error(
                "slot state %s is unreadable (%s); moved to %s, starting on the factory model", raw[:80], exc, aside
            )
            return None

    def save(self, state: SlotState) -> None:
        """Replace the state file atomically and durably."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state_path, msgspec.json.encode(state))

    def clear(self) -> None:
        with suppress(FileNotFoundError):
            self.state_path.unlink()
        fsync_dir(self.root)

    def path(self, record: SlotRecord) -> Path:
        return self.root / record.file

    def stage(self, source: Path, slot: SlotName, model: ModelRef) -> SlotRecord:
        """Put `source` into `slot` as {sha256}.onnx (hard link when possible, else a durable copy);
        the caller checks the sha256 (loading the model hashes the file anyway)."""
        rel = f"{slot}/{model.sha256}.onnx"
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            partial = dest.with_name(dest.name + ".partial")
            with suppress(FileNotFoundError):
                partial.unlink()
            try:
                # The content store renames finished files into place and never rewrites them,
                # so sharing the inode is safe and costs no space.
                os.link(source, partial)
            except OSError:
                copy_atomic(source, dest)
            else:
                partial.replace(dest)
                fsync_dir(dest.parent)
        return SlotRecord(model=model, file=rel, installed_at=time.time())

    def prune(self, state: SlotState | None) -> None:
        """Delete slot files the state does not name (a replaced or rolled-back model)."""
        keep = {self.root / r.file for r in state.slots.values()} if state else set()
        for slot in SLOTS:
            folder = self.root / slot
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path not in keep:
                    log.info("removing unused slot file %s", path)
                    path.unlink()


def load_slot(store: SlotStore, record: SlotRecord, load: Loader) -> Classifier:
    """Load a slot's model; its file must still hash to the recorded sha256. Results carry the
    recorded ref (the name and version the cloud installed it as)."""
    classifier = load(store.path(record))
    if classifier.info.ref.sha256 != record.model.sha256:
        raise ModelLoadError(
            f"slot file {store.path(record)} has sha256 {classifier.info.ref.sha256}, the slot state says "
            f"{record.model.sha256}: it was changed on disk; reinstall the model"
        )
    classifier.info = dataclasses.replace(classifier.info, ref=record.model)
    return classifier


def describe(ref: ModelRef) -> str:
    """A model as logs and ack reasons name it."""
    return f"{ref.name} {ref.version} ({ref.sha256[:12]})"
