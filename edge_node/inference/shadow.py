"""A candidate model run in shadow beside the active one: a rollout's shadow stage, on the device.

The router hands each scored batch to `ShadowRunner.offer` after the active model's answers are
known. A sampled share (`[ota] shadow_share`) of its inputs is copied into a small bounded queue,
and the runner's own thread (at the lowest CPU priority) runs the candidate on them; when the queue
is full the sample is dropped and counted (`skipped`), so the shadow never holds up the active
model's answers (bench/edge_pipeline.py measures the cost). The shadow's answers are never used:
they are only compared, with the active model's top-1, with the input's known label (`truth`) where
there is one, and with the cloud's answer where the active model escalated and the cloud answered
(`cloud_answer`, from the router). A cloud reply that arrives before the shadow thread ran that
input is not compared.

`take()` closes the window's counts into the telemetry's `shadow` field (schemas ShadowStats).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_node.inference.model import Classifier
from edge_node.input.intake import InputItem
from schemas import ModelRef, ShadowStats

log = logging.getLogger(__name__)

QUEUE_BATCHES = 4  # sampled batches waiting for the shadow thread; more are dropped
# Sampled rows are gathered into one job of at least this many rows (or after FLUSH_S): fewer
# wake-ups of the shadow thread, each of which costs the serving thread a GIL hand-off.
MIN_ROWS = 256
FLUSH_S = 1.0
_REMEMBERED = 4096  # shadow answers kept by input id for a cloud reply to be compared with


@dataclass(slots=True)
class _Job:
    model: Classifier
    batch: npt.NDArray[Any]
    active: npt.NDArray[np.intp]  # the active model's top-1, indices into `labels`
    labels: tuple[str, ...]  # the active model's labels
    truths: list[tuple[int, str]]  # (row, label) of the rows whose label is known
    unsure: list[tuple[int, str]]  # (row, input id) of the rows the active model may escalate


@dataclass
class _Counts:
    inputs: int = 0
    skipped: int = 0
    errors: int = 0
    agreed: int = 0
    labeled: int = 0
    correct: int = 0
    active_correct: int = 0
    cloud_answered: int = 0
    cloud_agreed: int = 0
    active_cloud_agreed: int = 0
    confidence_sum: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)


def _merge(jobs: list[_Job]) -> _Job:
    """One job of the rows of several (same model, same active labels)."""
    if len(jobs) == 1:
        return jobs[0]
    truths: list[tuple[int, str]] = []
    unsure: list[tuple[int, str]] = []
    offset = 0
    for job in jobs:
        truths += [(row + offset, truth) for row, truth in job.truths]
        unsure += [(row + offset, input_id) for row, input_id in job.unsure]
        offset += len(job.batch)
    first = jobs[0]
    batch = np.concatenate([j.batch for j in jobs])
    return _Job(first.model, batch, np.concatenate([j.active for j in jobs]), first.labels, truths, unsure)


class ShadowRunner:
    """Runs a shadow model (if one is set) on a sampled share of the inputs, in its own thread."""

    def __init__(
        self, share: float, seed: int | None = None, min_rows: int = MIN_ROWS, flush_s: float = FLUSH_S
    ) -> None:
        self.share = share
        self.min_rows = min_rows
        self.flush_s = flush_s
        self._pending: list[_Job] = []
        self._pending_rows = 0
        self._pending_since = 0.0
        self._model: Classifier | None = None
        self._rng = np.random.default_rng(seed)
        self._queue: queue.Queue[_Job | None] = queue.Queue(QUEUE_BATCHES)
        self._lock = threading.Lock()
        self._counts = _Counts()
        self._answers: OrderedDict[str, str] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._maps: dict[tuple[tuple[str, ...], tuple[str, ...]], npt.NDArray[np.intp]] = {}

    @property
    def model(self) -> ModelRef | None:
        return None if self._model is None else self._model.info.ref

    def start(self, model: Classifier) -> None:
        """Shadow `model` from the next batch on (replacing any other; its counts start afresh)."""
        with self._lock:
            self._model = model
            self._counts = _Counts()
            self._answers.clear()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="shadow", daemon=True)
            self._thread.start()
        log.info(
            "shadow model started %s %s (%s)", model.info.ref.name, model.info.ref.version, model.info.ref.sha256[:12]
        )

    def stop(self) -> ModelRef | None:
        """Stop shadowing; return the model that was shadowed (None if none)."""
        with self._lock:
            old, self._model = self._model, None
        self._pending.clear()
        self._pending_rows = 0
        if old is not None:
            log.info("shadow model stopped %s %s", old.info.ref.name, old.info.ref.version)
        return None if old is None else old.info.ref

    def close(self) -> None:
        self.stop()
        if self._thread is not None:
            with contextlib.suppress(queue.Full):  # full: a daemon thread, it ends with the process
                self._queue.put_nowait(None)
            self._thread = None

    # ---- the hook (event loop) ---------------------------------------------------------------
    def offer(
        self,
        items: list[InputItem],
        batch: npt.NDArray[Any],
        top1: npt.NDArray[Any],
        confident: npt.NDArray[np.bool_],
        labels: tuple[str, ...],
    ) -> None:
        """A scored batch of the active model (`top1` its indices into `labels`; `confident` the rows
        answered at the edge, the others may be escalated): queue a sampled share. The per-row Python
        here is kept to the rows with a known label and the unsure ones, both few."""
        model = self._model
        if model is None or self.share <= 0:
            return
        n = len(items)
        picked = np.flatnonzero(self._rng.random(n) < self.share) if self.share < 1 else np.arange(n)
        if not len(picked):
            return
        rows = picked.tolist()
        truths = [(k, truth) for k, i in enumerate(rows) if (truth := items[i].truth) is not None]
        sure = confident[picked]
        unsure = [] if sure.all() else [(k, items[rows[k]].input_id) for k in np.flatnonzero(~sure).tolist()]
        job = _Job(model, batch[picked], np.asarray(top1)[picked], labels, truths, unsure)
        pending = self._pending
        if pending and (pending[0].model is not model or pending[0].labels != labels):
            pending.clear()  # a model switched meanwhile: its rows are not worth a job of their own
            self._pending_rows = 0
        now = time.monotonic()
        if not pending:
            self._pending_since = now
        pending.append(job)
        self._pending_rows += len(rows)
        if self._pending_rows < self.min_rows and now - self._pending_since < self.flush_s:
            return
        merged, taken = _merge(pending), self._pending_rows
        pending.clear()
        self._pending_rows = 0
        try:
            self._queue.put_nowait(merged)
        except queue.Full:
            with self._lock:
                self._counts.skipped += taken

    def cloud_answer(self, input_id: str, cloud_label: str, active_agreed: bool) -> None:
        """The cloud answered an escalated input: compare with the shadow's answer, if it has one."""
        if self._model is None:
            return
        with self._lock:
            shadow_label = self._answers.pop(input_id, None)
            if shadow_label is None:
                return
            c = self._counts
            c.cloud_answered += 1
            c.cloud_agreed += shadow_label == cloud_label
            c.active_cloud_agreed += active_agreed

    def take(self) -> ShadowStats | None:
        """The window's counts (then reset); None when nothing is shadowed and nothing was counted."""
        with self._lock:
            model, counts = self._model, self._counts
            self._counts = _Counts()
        if model is None:
            return None  # counts of a model stopped mid-window are not reported: the stage is over
        lat = counts.latencies_ms
        return ShadowStats(
            model=model.info.ref,
            inputs=counts.inputs,
            skipped=counts.skipped,
            errors=counts.errors,
            agreed=counts.agreed,
            labeled=counts.labeled,
            correct=counts.correct,
            active_correct=counts.active_correct,
            cloud_answered=counts.cloud_answered,
            cloud_agreed=counts.cloud_agreed,
            active_cloud_agreed=counts.active_cloud_agreed,
            confidence_mean=min(1.0, counts.confidence_sum / counts.inputs) if counts.inputs else None,
            latency_p95_ms=float(np.percentile(lat, 95)) if lat else None,
        )

    # ---- the shadow thread -------------------------------------------------------------------
    def drain(self) -> None:
        """Block until every queued sample has been run (tests and the bench; never the event loop)."""
        self._queue.join()

    def _work(self) -> None:
        # The lowest CPU priority for this thread (Linux schedules threads by their own nice value):
        # on a busy device the active model's answers go first and the shadow drops samples instead.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if job.model is self._model:  # else stopped or replaced meanwhile
                    self._run_counted(job)
            finally:
                self._queue.task_done()

    def _run_counted(self, job: _Job) -> None:
        try:
            self._run(job)
        except Exception as exc:  # the shadow model failing must never touch serving
            with self._lock:
                if job.model is self._model:
                    self._counts.errors += len(job.batch)
            log.warning("shadow model raised on %d inputs: %s: %s", len(job.batch), type(exc).__name__, exc)

    def _run(self, job: _Job) -> None:
        n = len(job.batch)
        start = time.perf_counter()
        probs = job.model.predict(job.batch)
        per_input_ms = (time.perf_counter() - start) * 1000 / n
        labels = job.model.info.labels
        top = probs.argmax(axis=1)
        agreed = int((top == self._label_map(job.labels, labels)[job.active]).sum())
        conf = float(probs.max(axis=1).sum())
        with self._lock:
            if job.model is not self._model:
                return
            c = self._counts
            c.inputs += n
            c.agreed += agreed
            c.confidence_sum += conf
            c.latencies_ms.append(per_input_ms)
            for row, truth in job.truths:
                c.labeled += 1
                c.correct += labels[top[row]] == truth
                c.active_correct += job.labels[job.active[row]] == truth
            for row, input_id in job.unsure:
                self._answers[input_id] = labels[top[row]]
            while len(self._answers) > _REMEMBERED:
                self._answers.popitem(last=False)

    def _label_map(self, active: tuple[str, ...], shadow: tuple[str, ...]) -> npt.NDArray[np.intp]:
        """For each active label index, the shadow model's index of the same label (-1: it has none)."""
        key = (active, shadow)
        if self._maps.get(key) is None:
            where = {label: i for i, label in enumerate(shadow)}
            self._maps = {key: np.array([where.get(label, -1) for label in active], dtype=np.intp)}
        return self._maps[key]
