"""The inference pipeline: queue -> micro-batch -> model -> routing -> results, samples, escalations.

Inputs are taken from the queue as they come, in batches and serial jobs sized by their measured
cost (edge_node/inference/batching.py), checked (checks.py), and run by the model in a worker thread
so the event loop (and the MQTT keep-alive) never waits on it, except a batch that
edge_node/inference/runcost.py measured under 250 µs: that runs inline, since the thread hop would
cost more than the model (dispatch.py). Two batches are in inference at once, so the model runs the
next batch while the loop routes the previous one (edge_node/routing/router.py). Everything the
pipeline emits goes into the outbox in one `put_many` per batch, or per group of consecutive batches
under load (COMMIT_GROUP_S); up to COMMITS_IN_FLIGHT commits overlap the next batches, and an input
counts as done (`task_done`, the source's `on_done`) only once its batch is committed.

The model can be switched while inputs flow (OTA, edge_node/ota/installer.py): each batch takes the
classifier once when it starts and every sample, escalation and result of that batch carries that
model, so no batch mixes models and a switch never waits for or interrupts inference. Per-model
counters (edge_node/inference/stats.py) let the installer judge a new model against the old one
during probation.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_node.config import EdgeConfig
from edge_node.errors import InputRejected, OutboxError
from edge_node.inference.batching import CommitGroup, intake_bound, job_size
from edge_node.inference.checks import check_each, stack_if_clean
from edge_node.inference.dispatch import run_one_by_one, start_run
from edge_node.inference.model import Classifier, ModelInfo
from edge_node.inference.runcost import RunCost
from edge_node.inference.shadow import ShadowRunner
from edge_node.inference.stats import ModelActivity, ModelStats
from edge_node.inference.worker import ModelWorker, Ran
from edge_node.input.intake import InputItem, Intake, notify_done
from edge_node.routing.answers import AnswerBuilder
from edge_node.routing.confidence import decide, decide_scores
from edge_node.routing.escalation import Escalations
from edge_node.routing.router import Router
from edge_node.routing.sampling import UncertaintySampler
from edge_node.telemetry import Window
from edge_node.uplink.outbox import Outbox, OutMessage
from edge_node.uplink.wire import Wire, device_wire

log = logging.getLogger(__name__)
# Commits (of a group of batches each) that may still be running while the next batches are
# inferred: the commit (a thread hop to the SQLite writer and back) overlaps inference instead of
# adding to it.
COMMITS_IN_FLIGHT = 32
# Batches started on the model at once: one running, the next waiting in the worker's queue, so the
# model goes on while the loop post-processes (more would only hold inputs back from batching).
INFERENCES_IN_FLIGHT = 2


@dataclass(slots=True)
class _Batch:
    """What one batch hands to the outbox, and what becomes final once that is committed."""

    items: list[InputItem]  # every input the batch took off the queue (task_done after the commit)
    out: list[OutMessage] = field(default_factory=list)
    finished: list[InputItem] = field(default_factory=list)  # answered: on_done(ok=True) once durable
    processed: int = 0


@dataclass(slots=True)
class _Started:
    """A batch whose model run has started: its inputs, the model it took, and the run."""

    items: list[InputItem]  # every input taken off the queue for this batch
    classifier: Classifier
    stats: ModelStats
    good: list[InputItem]  # the inputs that passed the checks, in `batch` order
    batch: npt.NDArray[Any]
    run: asyncio.Future[Ran] | None  # None when no input passed the checks


class Pipeline:
    def __init__(
        self,
        config: EdgeConfig,
        classifier: Classifier,
        outbox: Outbox,
        escalations: Escalations,
        sampler: UncertaintySampler,
        window: Callable[[], Window],
        online: Callable[[], bool],
        wire: Wire | None = None,
    ) -> None:
        """`wire` encodes what routing sends (the node's one wire; a test may leave it to the config)."""
        self.config = config
        self.classifier = classifier
        self.outbox = outbox
        self.escalations = escalations
        self.sampler = sampler
        self._window = window
        self._worker = ModelWorker()
        answers = AnswerBuilder(config, sampler, window, wire or device_wire(config, outbox))
        # A rollout's shadow stage runs its candidate here (edge_node/inference/shadow.py).
        self.shadow = ShadowRunner(config.ota.shadow_share)
        self._router = Router(config, answers, escalations, outbox, window, online, self.shadow)
        self.processed = 0
        self._store_errors = 0  # commits (of one batch or a group) the outbox refused, whole or in part
        self._cost = RunCost()
        self._activity = ModelActivity()

    @property
    def outbox_errors(self) -> int:
        """Commits the outbox refused, whole or in part (batches, and answers sent on their own)."""
        return self._store_errors + self._router.coalescer.outbox_errors

    async def flush_results(self) -> None:
        """Commit the answers waiting to share a results message (the SIGTERM drain calls this)."""
        await self._router.coalescer.flush()

    # ---- model switching ---------------------------------------------------------------------
    def switch_model(self, classifier: Classifier) -> Classifier:
        """Make `classifier` serve from the next batch on; return the one it replaces.

        Synchronous on the event loop, so it lands between two batches' starts: a batch already
        running finishes with the model it took."""
        old, self.classifier = self.classifier, classifier
        self._activity.activated(classifier.info.ref.sha256)  # probation judges this activation only
        log.info(
            "model switched from %s %s (%s) to %s %s (%s)",
            old.info.ref.name,
            old.info.ref.version,
            old.info.ref.sha256[:12],
            classifier.info.ref.name,
            classifier.info.ref.version,
            classifier.info.ref.sha256[:12],
        )
        return old

    def model_stats(self, sha256: str) -> ModelStats:
        """The counters of the model with this sha256 since it (last) became active."""
        return self._activity.stats(sha256)

    def recent_inputs(self, limit: int = 64) -> npt.NDArray[Any] | None:
        """Up to `limit` checked inputs the node ran most recently (None before the first batch)."""
        return self._activity.recent_inputs(limit)

    # ---- the loop ----------------------------------------------------------------------------
    async def run(self, queue: Intake) -> None:
        """Process the queue until cancelled; escalations still waiting finish in `tasks`.

        Two batches are in inference at a time: while the loop post-processes one (routing,
        sampling, results, outbox), the next already runs in the worker, so the model never waits
        for the loop's Python work. The next batch is formed from what waits in the queue when
        there is room for it; with an idle queue, an input starts the moment it arrives.
        Finished batches share a commit under load (`CommitGroup`, COMMIT_GROUP_S), and up to
        COMMITS_IN_FLIGHT commits run while the next batches are inferred. An input is
        `task_done` only once its batch's messages are committed, so `queue.join()` (the SIGTERM
        drain) still means: everything taken is answered and durable.
        """
        started: deque[_Started] = deque()
        commits: deque[asyncio.Task[None]] = deque()
        uncommitted: list[_Batch] = []
        self._router.coalescer.attach(queue.hold, queue.task_done)
        try:
            async with asyncio.TaskGroup() as tasks:
                group = CommitGroup[_Batch](
                    lambda batches: commits.append(tasks.create_task(self._commit(batches, queue)))
                )
                try:
                    while True:
                        if not started:
                            await queue.nonempty()
                            started.append(self._start(queue))
                        if len(started) < INFERENCES_IN_FLIGHT and not queue.empty():
                            started.append(self._start(queue))
                        current = started[0]
                        batch = await self._finish(current, tasks)
                        started.popleft()
                        group.add(batch)
                        if not started and queue.empty():
                            group.flush()
                        while commits and (len(commits) >= COMMITS_IN_FLIGHT or commits[0].done()):
                            await commits.popleft()
                finally:
                    # Before the task group shuts down: its timer must not start a commit then.
                    uncommitted = group.close()
        finally:
            # Taken off the queue but never committed (cancelled mid-way): the drain must not hang.
            for taken in [pending.items for pending in started] + [batch.items for batch in uncommitted]:
                self._task_done(queue, taken)
            self._worker.close()
            self.shadow.close()

    def _start(self, queue: Intake) -> _Started:
        """Take what waits as a batch, check it, and start the model on it (worker or inline)."""
        # Per batch: a model switched in may differ in whether it batches.
        classifier = self.classifier  # the whole batch runs on this model, whatever switches meanwhile
        per_run = self.config.model.max_batch if classifier.info.dynamic_batch else 1
        cost = self._cost.for_model(classifier)
        take, planned = job_size(classifier.info.input_bytes, cost, per_run)
        bound = intake_bound(planned, classifier.info.input_bytes)
        if queue.maxsize != bound:
            queue.resize(bound)
        items = queue.get_batch_nowait(take)
        stats = self._activity.stats(classifier.info.ref.sha256)
        good, batch = items, stack_if_clean(items, classifier)
        if batch is None:  # not the common case: check input by input, reject just the bad ones
            good, batch = check_each(items, classifier, lambda item, exc: self._rejected(item, exc, stats))
        if batch is None:
            return _Started(items, classifier, stats, good, np.empty(0), None)
        run = start_run(self._worker, classifier, cost, batch, per_run)
        return _Started(items, classifier, stats, good, batch, run)

    async def _commit(self, group: list[_Batch], queue: Intake) -> None:
        try:
            await self._store(group)
        finally:
            for batch in group:
                self._task_done(queue, batch.items)

    async def _store(self, group: list[_Batch]) -> None:
        """Commit the group's messages in one transaction, then tell the sources its inputs are answered."""
        out = [msg for batch in group for msg in batch.out]
        if out:
            try:
                await self.outbox.put_many(out)
            except OutboxError as exc:
                # The answers were given locally; only their uplink is lost (the outbox counts
                # rejections, and telemetry reports it unavailable). The node keeps serving.
                self._store_errors += 1
                log.error(
                    "outbox refused the messages of %d batch(es) inputs=%d messages=%d: %s",
                    len(group),
                    sum(len(batch.items) for batch in group),
                    len(out),
                    exc,
                )
        for batch in group:
            notify_done(batch.finished, ok=True)
            self.processed += batch.processed

    @staticmethod
    def _task_done(queue: Intake, items: list[InputItem]) -> None:
        if items:
            queue.task_done(len(items))

    async def _finish(self, started: _Started, tasks: asyncio.TaskGroup) -> _Batch:
        """Everything a batch does after its model run up to its outbox commit; returns what that
        commit needs."""
        result = _Batch(started.items)
        good, batch, run = started.good, started.batch, started.run
        if run is None:  # nothing passed the checks
            return result
        classifier, stats = started.classifier, started.stats
        info = classifier.info
        threshold = self.config.routing.confidence_threshold
        try:
            ran = await run
        except Exception as exc:  # any model failure: counted, logged, the node keeps serving
            if len(good) == 1:
                self._model_failed(good, info, stats, exc)
                return result

            # One input may have upset the model: only it should fail, not its batch-mates.
            def failed(item: InputItem, error: Exception) -> None:
                self._model_failed([item], info, stats, error)

            good, batch, probs = await run_one_by_one(self._worker, classifier, good, batch, failed)
            if not good:
                return result
            decision = decide(probs, threshold)
        else:
            if not ran.inline and self._cost.key is classifier:  # not a model switched out meanwhile
                self._cost.record(len(batch), ran.seconds, inline=False)
            decision = decide_scores(ran.scores, info.output_kind, threshold)
        self._activity.recent.append(batch)
        stats.inferences += len(good)
        stats.confidence_sum += float(decision.confidence.sum())
        self._window().add_batch(batch, decision.confidence, decision.entropy)
        result.out, result.finished = self._router.route(good, batch, decision, info, tasks)
        result.processed = len(good)
        return result

    # ---- failures ----------------------------------------------------------------------------
    def _model_failed(self, items: list[InputItem], info: ModelInfo, stats: ModelStats, exc: Exception) -> None:
        """The model raised in run: its inputs are rejected as "model_error" (counted per model)."""
        stats.model_failed(len(items), exc)
        self._window().rejected["model_error"] += len(items)
        log.error(
            "model %s %s (%s) raised on a batch of %d, inputs rejected as model_error: %s",
            info.ref.name,
            info.ref.version,
            info.ref.sha256[:12],
            len(items),
            stats.last_error,
        )
        for item in items:
            item.error = InputRejected("model_error", stats.last_error)
        notify_done(items, ok=False)

    def _rejected(self, item: InputItem, exc: InputRejected, stats: ModelStats) -> None:
        """An input failed its checks: counted for its model and in the window, logged, finished."""
        stats.rejected += 1
        self._window().rejected[exc.reason] += 1
        log.warning(
            "input rejected id=%s source=%s reason=%s detail=%s",
            item.input_id,
            item.source_ref,
            exc.reason,
            exc.detail,
        )
        notify_done([item], ok=False)
