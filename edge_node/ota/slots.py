"""A/B model slots on the edge: install a verified model, health-check it, switch atomically, roll back.

Layout under `{ota state_dir}/slots/`:

    state.json        which slot is active, what each slot holds, the previous slot, and the switch
                      still on probation (its command, boot attempts, the old model's baseline)
    A/{sha256}.onnx   the model of slot A (named by content, so a half-copied file is never it)
    B/{sha256}.onnx

Until the first install there is no state and the node runs the factory model (`[model] path`); the
first install copies it into slot A and installs into B. `state.json` is replaced atomically
(write, fsync, rename, fsync the directory), always *before* the pipeline switches, so a crash at
any point leaves a state that names a complete, verified file.

Install: link/copy the verified file into the standby slot -> load it in a worker thread -> health
check (edge_node/ota/health.py) in a worker thread -> persist the switch (pending, boot attempts 0) ->
`Pipeline.switch_model` between two batches -> ack "installed" -> probation -> persist "confirmed"
-> ack "done"; or switch back and ack "rolled_back" with the reason. Inference never stops: loading
and checking run beside it and the switch is one assignment on the event loop.

Crash loop: `boot_attempts` counts the runs of the node with a switch still on probation that
did not stop cleanly: the switch sets it to 1 (this run), every start adds one *before* loading the
model, a clean stop takes its own back. So at start, `boot_attempts` runs have died with the new
model; at `crash_loop_limit` of them the node starts on the previous slot instead and acks
"rolled_back" for that command.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

from common.files import copy_atomic, file_sha256, fsync_dir, write_atomic
from edge_node.config import OtaConfig
from edge_node.errors import ModelLoadError, OutboxError, SlotError, Unhealthy
from edge_node.inference.model import Classifier
from edge_node.inference.pipeline import Pipeline
from edge_node.ota.health import (
    Baseline,
    HealthPolicy,
    ProbationPolicy,
    check_compatible,
    check_health,
    probation_verdict,
)
from edge_node.uplink.outbox import Outbox, OutMessage, Priority
from schemas import Channel, Command, CommandAck, ModelRef, ModelUpdate, Topics, encode, new_msg_id
from schemas.messages import AckState

log = logging.getLogger(__name__)

SlotName = Literal["A", "B"]
SLOTS: tuple[SlotName, SlotName] = ("A", "B")
STATE_FILE = "state.json"
# How often probation re-reads the new model's counters (an exception in its run wakes it at once).
PROBATION_CHECK_S = 0.5
Loader = Callable[[Path], Classifier]


# ---- persisted state ---------------------------------------------------------------------------
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


# ---- boot ----------------------------------------------------------------------------------------
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
                f"crash loop: the node died {died} times before model {_describe(pending.model)} passed "
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


def _describe(ref: ModelRef) -> str:
    return f"{ref.name} {ref.version} ({ref.sha256[:12]})"


# ---- the installer ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstallPolicy:
    probation: ProbationPolicy
    crash_loop_limit: int = 3
    latency_runs: int = 50
    max_latency_budget_ms: float = 0.0  # > 0: the device's own cap on the command's budget

    @classmethod
    def from_config(cls, ota: OtaConfig) -> InstallPolicy:
        return cls(
            probation=ProbationPolicy(
                duration_s=ota.health_probation_s,
                min_inferences=ota.probation_min_inferences,
                max_confidence_drop=ota.probation_max_confidence_drop,
                max_error_rate_increase=ota.probation_max_error_rate_increase,
            ),
            crash_loop_limit=ota.crash_loop_limit,
            latency_runs=ota.health_latency_runs,
            max_latency_budget_ms=ota.health_max_latency_budget_ms,
        )


class CommandAcks:
    """Builds CommandAck messages and stores them in the outbox (CONTROL priority)."""

    def __init__(self, outbox: Outbox, topics: Topics, fleet_id: str, device_id: str) -> None:
        self.outbox = outbox
        self.topic = topics.device(fleet_id, device_id, Channel.CMD_ACK)
        self.fleet_id, self.device_id = fleet_id, device_id
        self.failed = 0

    async def send(
        self,
        cmd_id: str,
        state: AckState,
        *,
        reason: str | None = None,
        model: ModelRef | None = None,
        active_slot: SlotName | None = None,
        rollout_id: str | None = None,
    ) -> None:
        ack = CommandAck(
            msg_id=new_msg_id(),
            fleet_id=self.fleet_id,
            device_id=self.device_id,
            ts=time.time(),
            cmd_id=cmd_id,
            state=state,
            reason=reason[:1024] if reason else None,
            model=model,
            active_slot=active_slot,
            rollout_id=rollout_id,
        )
        log.info("cmd ack cmd_id=%s state=%s slot=%s reason=%s", cmd_id, state, active_slot, reason)
        try:
            await self.outbox.put(OutMessage(self.topic, encode(ack), Priority.CONTROL, ack.msg_id))
        except OutboxError as exc:
            self.failed += 1
            log.error("ack %s for command %s not stored: %s", state, cmd_id, exc)


class SlotManager:
    """Implements the OTA `Installer` protocol (edge_node/ota/agent.py) with A/B slots.

    `run()` must be running (a task of the node's TaskGroup): it finishes what the boot left over
    (a crash-loop rollback ack, a probation to resume) and hosts the probation tasks."""

    def __init__(
        self,
        store: SlotStore,
        boot: Boot,
        pipeline: Pipeline,
        acks: CommandAcks,
        load: Loader,
        policy: InstallPolicy,
        on_switch: Callable[[Classifier], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.state = boot.state
        self.pipeline = pipeline
        self.acks = acks
        self.load = load
        self.policy = policy
        self._on_switch = on_switch
        self._boot = boot
        self._lock = asyncio.Lock()
        self._tasks: asyncio.TaskGroup | None = None
        self._probation: asyncio.Task[None] | None = None
        self._probation_cmd: PendingSwitch | None = None
        self._old: Classifier | None = None  # the model before the switch, kept for an instant way back

    @property
    def active_slot(self) -> SlotName | None:
        return self.state.active if self.state else None

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            boot = self._boot
            if boot.rolled_back is not None:
                await self._ack_pending(boot.rolled_back, "rolled_back", boot.rollback_reason)
            if boot.resume is not None:
                self._start_probation(boot.resume)
            await asyncio.Future()  # probation tasks run here until the node stops

    async def close(self) -> None:
        """A clean stop: this run did not die with the model on probation, so it takes back its
        boot attempt (the probation itself starts over at the next start)."""
        async with self._lock:
            state = self.state
            if state is None or state.pending is None:
                return
            pending = msgspec.structs.replace(state.pending, boot_attempts=max(state.pending.boot_attempts - 1, 0))
            self.state = msgspec.structs.replace(state, pending=pending)
            await asyncio.to_thread(self.store.save, self.state)

    # ---- install -------------------------------------------------------------------------------
    async def install(self, model_path: Path, command: Command) -> None:
        """Install the verified file for `command`; returns once it is switched to (probation goes on
        in the background) or refused. Every outcome is acked; nothing here raises for a bad model."""
        if self._tasks is None:
            raise RuntimeError("SlotManager.run() must be running before a model can be installed")
        if command.update is None:
            await self.acks.send(command.cmd_id, "failed", reason="model_update command without an update")
            return
        await self._wait_probation()
        async with self._lock:
            await self._install_locked(model_path, command, command.update)

    async def _install_locked(self, model_path: Path, command: Command, update: ModelUpdate) -> None:
        target = update.model
        current = self.pipeline.classifier
        if current.info.ref.sha256 == target.sha256:
            await self._ack(command, "done", f"model {_describe(target)} is already active", target)
            return
        await self._ack(command, "installing", None, target)
        try:
            state = self.state if self.state is not None else await asyncio.to_thread(self._factory_state, current)
            slot = state.standby
            record = await asyncio.to_thread(self.store.stage, model_path, slot, target)
            candidate = await asyncio.to_thread(self.load, self.store.path(record))
        except (OSError, SlotError) as exc:
            await self._ack(command, "failed", f"cannot stage the model file {model_path}: {exc}", target)
            return
        except ModelLoadError as exc:
            await self._health_failed(command, target, f"does not load: {exc}")
            return
        if candidate.info.ref.sha256 != target.sha256:
            await self._health_failed(
                command, target, f"file sha256 {candidate.info.ref.sha256} is not the command's {target.sha256}"
            )
            return
        candidate.info = dataclasses.replace(candidate.info, ref=target)
        health = HealthPolicy(update.health_tolerance, self._budget(update), self.policy.latency_runs)
        report = await asyncio.to_thread(check_health, candidate, current, self.pipeline.recent_inputs(), health)
        if not report.ok:
            await self._health_failed(command, target, report.reason)
            return
        log.info("model %s passed the health check: %s", _describe(target), report.reason)
        await self._switch_to(command, state, slot, record, candidate, report.reason)

    def _budget(self, update: ModelUpdate) -> float:
        budget = update.latency_budget_ms
        cap = self.policy.max_latency_budget_ms
        return min(budget, cap) if cap > 0 else budget

    def _factory_state(self, current: Classifier) -> SlotState:
        """First install: the factory model becomes slot A (blocking: hashes the copy)."""
        record = self.store.stage(current.info.path, "A", current.info.ref)
        if file_sha256(self.store.path(record)) != current.info.ref.sha256:
            raise SlotError(f"factory model {current.info.path} changed on disk since the node loaded it")
        return SlotState(active="A", slots={"A": record})

    async def _switch_to(
        self, command: Command, state: SlotState, slot: SlotName, record: SlotRecord, candidate: Classifier, health: str
    ) -> None:
        old = self.pipeline.classifier
        pending = PendingSwitch(
            cmd_id=command.cmd_id,
            rollout_id=command.rollout_id,
            model=record.model,
            slot=slot,
            previous=state.active,
            switched_at=time.time(),
            boot_attempts=1,  # this run; a clean stop takes it back
            baseline=Baseline.of(self.pipeline.model_stats(old.info.ref.sha256)),
        )
        new_state = SlotState(active=slot, slots={**state.slots, slot: record}, previous=state.active, pending=pending)
        try:
            await asyncio.to_thread(self.store.save, new_state)
        except OSError as exc:
            await self._ack(command, "failed", f"cannot persist the slot state in {self.store.root}: {exc}", None)
            return
        self.state = new_state
        await self._activate(candidate)
        self._old = old
        probation = self.policy.probation.duration_s
        await self._ack(command, "installed", f"health check passed ({health}); probation {probation:g} s")
        self._start_probation(pending)

    async def _health_failed(self, command: Command, target: ModelRef, reason: str) -> None:
        log.error("model %s failed the health check: %s", _describe(target), reason)
        await asyncio.to_thread(self.store.prune, self.state)
        await self._ack(command, "health_failed", reason, target)

    # ---- probation -----------------------------------------------------------------------------
    def _start_probation(self, pending: PendingSwitch) -> None:
        if self._tasks is None:
            raise RuntimeError("SlotManager.run() must be running before a model can be installed")
        self._probation_cmd = pending
        self._probation = self._tasks.create_task(self._watch(pending), name=f"probation-{pending.slot}")

    async def _wait_probation(self) -> None:
        task = self._probation
        if task is not None and not task.done():
            log.info("waiting for the probation of slot %s to end before the next install", self.active_slot)
            await asyncio.wait({task})

    async def _watch(self, pending: PendingSwitch) -> None:
        """Watch the new model until the verdict; a rollback command may cancel the watching, but
        never a conclusion halfway (shielded), and a conclusion for a switch a rollback already
        ended does nothing."""
        reason, inferences = await self._observe(pending)
        await asyncio.shield(self._conclude(pending, reason, inferences))

    async def _observe(self, pending: PendingSwitch) -> tuple[str | None, int]:
        policy = self.policy.probation
        stats = self.pipeline.model_stats(pending.model.sha256)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + policy.duration_s
        while (reason := probation_verdict(stats, pending.baseline, policy)) is None:
            left = deadline - loop.time()
            if left <= 0:
                break
            with suppress(TimeoutError):
                async with asyncio.timeout(min(left, PROBATION_CHECK_S)):
                    await stats.failed.wait()
        return reason, stats.inferences

    async def _conclude(self, pending: PendingSwitch, reason: str | None, inferences: int) -> None:
        async with self._lock:
            if self._probation_cmd is not pending:
                return
            self._probation_cmd = None
            if reason is None:
                await self._confirm(pending, inferences)
            else:
                await self._revert_pending(pending, f"probation failed: {reason}")

    async def _confirm(self, pending: PendingSwitch, inferences: int) -> None:
        assert self.state is not None
        self.state = msgspec.structs.replace(self.state, pending=None)
        await asyncio.to_thread(self.store.save, self.state)
        self._old = None
        await self._ack_pending(pending, "done", f"probation passed ({inferences} inferences)")

    async def _revert_pending(self, pending: PendingSwitch, reason: str) -> bool:
        """Back to the slot before `pending` (lock held) and ack its command rolled_back; False
        (acked failed) when the previous slot cannot serve."""
        log.error("rolling back model %s: %s", _describe(pending.model), reason)
        try:
            await self._switch_back(pending.previous)
        except (ModelLoadError, Unhealthy, OSError) as exc:
            # Nothing to go back to: keep serving the new model and stop counting boot attempts,
            # or the crash-loop logic would later switch to the broken slot.
            log.error("cannot go back to slot %s (%s); staying on %s", pending.previous, exc, pending.slot)
            if self.state is not None:
                self.state = SlotState(active=pending.slot, slots={pending.slot: self.state.slots[pending.slot]})
                await asyncio.to_thread(self.store.save, self.state)
            await self._ack_pending(pending, "failed", f"{reason}; cannot go back to slot {pending.previous}: {exc}")
            return False
        await self._ack_pending(pending, "rolled_back", reason)
        return True

    async def _switch_back(self, target: SlotName) -> Classifier:
        """Make `target` active again and forget the other slot's model (lock held)."""
        assert self.state is not None
        record = self.state.slots[target]
        old = self._old
        classifier = old if old is not None and old.info.ref.sha256 == record.model.sha256 else None
        if classifier is None:
            classifier = await asyncio.to_thread(load_slot, self.store, record, self.load)
            check_compatible(classifier.info, self.pipeline.classifier.info)
        new_state = SlotState(active=target, slots={target: record})
        await asyncio.to_thread(self.store.save, new_state)
        self.state = new_state
        await self._activate(classifier)
        self._old = None
        await asyncio.to_thread(self.store.prune, new_state)
        return classifier

    # ---- rollback ------------------------------------------------------------------------------
    async def rollback(self, command: Command) -> None:
        """Go back to the previous slot (a switch on probation is ended first, and its own command
        acked rolled_back); ack this command rolled_back, or failed when there is nothing to go to."""
        async with self._lock:
            pending, self._probation_cmd = self._probation_cmd, None
            if self._probation is not None:
                self._probation.cancel()  # its conclusion, if already under way, sees it is not current
            state = self.state
            if state is None or state.previous is None:
                await self._ack(command, "failed", "no previous model to roll back to", None)
                return
            if pending is not None:
                if not await self._revert_pending(pending, f"rolled back by command {command.cmd_id}"):
                    await self._ack(command, "failed", f"cannot roll back to slot {pending.previous}", None)
                    return
            else:
                try:
                    await self._switch_back(state.previous)
                except (ModelLoadError, Unhealthy, OSError) as exc:
                    await self._ack(command, "failed", f"cannot roll back to slot {state.previous}: {exc}", None)
                    return
            ref = self.pipeline.classifier.info.ref
            await self._ack(command, "rolled_back", f"back on {_describe(ref)}", ref)

    # ---- helpers -------------------------------------------------------------------------------
    async def _activate(self, classifier: Classifier) -> None:
        self.pipeline.switch_model(classifier)
        if self._on_switch is not None:
            await self._on_switch(classifier)

    async def _ack(self, command: Command, state: AckState, reason: str | None, model: ModelRef | None = None) -> None:
        if model is None and command.update is not None:
            model = command.update.model
        await self.acks.send(
            command.cmd_id,
            state,
            reason=reason,
            model=model,
            active_slot=self.active_slot,
            rollout_id=command.rollout_id,
        )

    async def _ack_pending(self, pending: PendingSwitch, state: AckState, reason: str) -> None:
        await self.acks.send(
            pending.cmd_id,
            state,
            reason=reason,
            model=pending.model,
            active_slot=self.active_slot,
            rollout_id=pending.rollout_id,
        )
