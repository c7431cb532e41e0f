"""Starting the node on its model: the active slot, unless a switch on probation keeps crashing it.

Crash loop: `boot_attempts` counts the runs of the node with a switch still on probation that
did not stop cleanly: the switch sets it to 1 (this run), every start adds one *before* loading the
model, a clean stop takes its own back. So at start, `boot_attempts` runs have died with the new
model; at `crash_loop_limit` of them the node starts on the previous slot instead and acks
"rolled_back" for that command (the installer sends the ack once it runs). A slot whose file no
longer loads falls back the same way: the previous slot, else the factory model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import msgspec

from edge_node.errors import ModelLoadError
from edge_node.inference.model import Classifier
from edge_node.ota.slots import Loader, PendingSwitch, SlotState, SlotStore, describe, load_slot

log = logging.getLogger(__name__)


@dataclass
class Boot:
    """What the node starts with, and what the slot manager must finish once it runs."""

    classifier: Classifier
    state: SlotState | None
    rolled_back: PendingSwitch | None = None  # ack "rolled_back" for this command
    rollback_reason: str = ""
    resume: PendingSwitch | None = None  # probation to run again


def boot_slots(store: SlotStore, factory: Path, load: Loader, crash_loop_limit: int) -> Boot:
    """Choose and load the model to start with (blocking): the active slot, unless the node died
    `crash_loop_limit` times with it still on probation, or its file no longer loads."""
    state = store.load()
    if state is None:
        return Boot(load(factory), None)
    rolled_back, reason = None, ""
    pending = state.pending
    if pending is not None:
        died = pending.boot_attempts  # earlier runs with this model that did not stop cleanly
        if died >= crash_loop_limit:
            reason = (
                f"crash loop: the node died {died} times before model {describe(pending.model)} passed "
                f"probation (crash_loop_limit {crash_loop_limit}); back on slot {pending.previous}"
            )
            log.error("%s", reason)
            rolled_back, state = pending, _reverted(state, pending)
        else:
            state = msgspec.structs.replace(state, pending=msgspec.structs.replace(pending, boot_attempts=died + 1))
            log.warning("model in slot %s still on probation after %d unclean stop(s)", pending.slot, died)
        store.save(state)  # before loading: a crash while loading counts too
    try:
        classifier = load_slot(store, state.slots[state.active], load)
    except ModelLoadError as exc:
        return _boot_fallback(store, state, factory, load, str(exc), rolled_back, reason)
    resume = state.pending
    store.prune(state)
    return Boot(classifier, state, rolled_back, reason, resume)


def _boot_fallback(
    store: SlotStore,
    state: SlotState,
    factory: Path,
    load: Loader,
    error: str,
    rolled_back: PendingSwitch | None,
    reason: str,
) -> Boot:
    """The active slot does not load: the previous slot, else the factory model."""
    log.error("active slot %s does not load: %s", state.active, error)
    pending = state.pending
    target = pending.previous if pending is not None else state.previous
    if pending is not None:
        rolled_back, reason = pending, f"model in slot {state.active} no longer loads ({error}); back on {target}"
    if target is not None and target in state.slots:
        state = SlotState(active=target, slots={target: state.slots[target]})
        try:
            classifier = load_slot(store, state.slots[target], load)
        except ModelLoadError as exc:
            log.error("previous slot %s does not load either: %s; starting on the factory model", target, exc)
        else:
            store.save(state)
            store.prune(state)
            return Boot(classifier, state, rolled_back, reason)
    store.clear()
    store.prune(None)
    return Boot(load(factory), None, rolled_back, reason)


def _reverted(state: SlotState, pending: PendingSwitch) -> SlotState:
    """Back on the slot before `pending`; the model that failed is dropped (no rollback target)."""
    return SlotState(active=pending.previous, slots={pending.previous: state.slots[pending.previous]})
