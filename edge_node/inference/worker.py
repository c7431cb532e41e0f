"""The model's worker thread: runs the model off the event loop, one batch at a time, in order.

`loop.run_in_executor` costs, per job, a work item, a lock and a condition in the executor, and a
concurrent Future chained to an asyncio Future through two callbacks that take their own loop
iterations. On a 2-vCPU VM, where every wake-up of the loop costs ~45 µs of CPU and every extra
iteration a syscall, that is a tenth of what the loop may spend per batch-1 inference of a 1 ms
model. Here a job is a tuple on a SimpleQueue, and its asyncio future is resolved by one
`call_soon_threadsafe`. The run is timed inside the worker: the model's cost, not the hop's, which
is what RunCost (edge_node/inference/runcost.py) needs to decide what could run inline.

The worker does nothing but the run (`Classifier.scores`): the loop turns scores into
probabilities. Whatever the worker does between two runs delays the next one, and after a model
that streams its weights through the caches it all runs cold (on the 1 ms MLP of
bench/edge_pipeline.py, softmax and a CPU-clock read cost the worker ~30 µs per run, 2% of the
model's throughput).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from edge_node.inference.model import Classifier

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Ran:
    """A model run: its output (`Classifier.scores`) and the seconds the run took."""

    scores: npt.NDArray[Any]
    seconds: float
    inline: bool = False  # run on the event loop instead of the worker


_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Ran]", Classifier, npt.NDArray[Any], int | None]


class ModelWorker:
    """One daemon thread running `Classifier.scores` for jobs submitted from the event loop."""

    def __init__(self, name: str = "inference") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(
        self, classifier: Classifier, batch: npt.NDArray[Any], rows_per_run: int | None = None
    ) -> asyncio.Future[Ran]:
        """Queue a run of `batch`; the future holds its Ran, or the exception the run raised."""
        if self._closed:
            raise RuntimeError(f"model worker {self._name} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Ran] = loop.create_future()
        if self._thread is None:  # started on first use: a pipeline that never runs owns no thread
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put((loop, future, classifier, batch, rows_per_run))
        return future

    def close(self) -> None:
        """Cancel the queued jobs and let the thread end after the one it may be running."""
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[1].cancel()
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, classifier, batch, rows_per_run = job
            start = time.perf_counter()
            try:
                ran: Ran | None = Ran(classifier.scores(batch, rows_per_run), time.perf_counter() - start)
                error: BaseException | None = None
            # Anything, not only Exception: a run that raised must reach its batch (a model error
            # rejects the inputs, anything else stops the pipeline), never leave it waiting forever.
            except BaseException as exc:
                ran, error = None, exc
            try:
                loop.call_soon_threadsafe(_resolve, future, ran, error)
            except RuntimeError:  # the loop is closed: nobody waits for this run any more
                log.debug("model worker %s: loop closed, run result dropped", self._name)


def _resolve(future: asyncio.Future[Ran], ran: Ran | None, error: BaseException | None) -> None:
    if future.done():  # cancelled meanwhile (the pipeline stopped)
        return
    if error is not None:
        future.set_exception(error)
    elif ran is not None:
        future.set_result(ran)
