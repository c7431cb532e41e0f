"""Installing a verified model into the standby A/B slot, and the probation that follows the switch.

Install: link/copy the verified file into the standby slot -> load it in a worker thread -> health
check (edge_node/ota/health.py) in a worker thread -> persist the switch (pending, boot attempts 0) ->
`Pipeline.switch_model` between two batches -> ack "installed" -> probation -> persist "confirmed"
-> ack "done"; or switch back and ack "rolled_back" with the reason. Inference never stops: loading
and checking run beside it and the switch is one assignment on the event loop. A rollback command
goes back to the previous slot the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import msgspec

from common.files import file_sha256
from edge_node.config import OtaConfig
from edge_node.errors import ModelLoadError, SlotError, Unhealthy
from edge_node.inference.model import Classifier
from edge_node.inference.pipeline import Pipeline
from edge_node.ota.acks import CommandAcks
from edge_node.ota.boot import Boot
from edge_node.ota.health import (
    Baseline,
    HealthPolicy,
    ProbationPolicy,
    check_compatible,
    check_health,
    probation_verdict,
)
from edge_node.ota.slots import (
    Loader,
    PendingSwitch,
    SlotName,
    SlotRecord,
    SlotState,
    SlotStore,
    describe,
    load_slot,
)
from schemas import Command, ModelRef, ModelUpdate
from schemas.messages import AckState

log = logging.getLogger(__name__)

# How often probation re-reads the new model's counters (an exception in its run wakes it at once).
PROBATION_CHECK_S = 0.5


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


class SlotManager:
    """Implements the OTA `Installer` protocol (edge_node/ota/agent.py) with A/B slots (slots.py).

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
            await self.acks.send(command, "failed", reason="model_update command without an update")
            return
        await self._wait_probation()
        async with self._lock:
            await self._install_locked(model_path, command, command.update)

    async def _install_locked(self, model_path: Path, command: Command, update: ModelUpdate) -> None:
        target = update.model
        current = self.pipeline.classifier
        if current.info.ref.sha256 == target.sha256:
            await self._ack(command, "done", f"model {describe(target)} is already active", target)
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
        log.info("model %s passed the health check: %s", describe(target), report.reason)
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
        log.error("model %s failed the health check: %s", describe(target), reason)
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
        log.error("rolling back model %s: %s", describe(pending.model), reason)
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
            await self._ack(command, "rolled_back", f"back on {describe(ref)}", ref)

    # ---- helpers -------------------------------------------------------------------------------
    async def _activate(self, classifier: Classifier) -> None:
        self.pipeline.switch_model(classifier)
        if self._on_switch is not None:
            await self._on_switch(classifier)

    async def _ack(self, command: Command, state: AckState, reason: str | None, model: ModelRef | None = None) -> None:
        await self.acks.send(command, state, reason=reason, model=model, active_slot=self.active_slot)

    async def _ack_pending(self, pending: PendingSwitch, state: AckState, reason: str) -> None:
        await self.acks.send_for(
            pending.cmd_id,
            state,
            reason=reason,
            model=pending.model,
            active_slot=self.active_slot,
            rollout_id=pending.rollout_id,
        )
