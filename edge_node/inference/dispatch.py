"""Starting a batch on the model: inline on the event loop or in the worker thread, as RunCost
(edge_node/inference/runcost.py) measured; and, after a batch made the model raise, running its
inputs one at a time so that only the input that upset the model fails, not its batch-mates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_node.inference.model import Classifier
from edge_node.inference.runcost import RunCost
from edge_node.inference.worker import ModelWorker, Ran
from edge_node.input.intake import InputItem


def start_run(
    worker: ModelWorker, classifier: Classifier, cost: RunCost, batch: npt.NDArray[Any], per_run: int
) -> asyncio.Future[Ran]:
    """Start the model: inline when this batch size is measured to be cheap, else in the worker.

    Returns a future of the run (already done when inline, holding the model's exception if it
    raised). An inline run's cost is recorded at once (a run over the probe limit must stop the
    next batch from running inline too), a worker run's when the pipeline takes it."""
    if not cost.inline(len(batch)):
        return worker.submit(classifier, batch, per_run)
    future: asyncio.Future[Ran] = asyncio.get_running_loop().create_future()
    start = time.perf_counter()
    try:
        future.set_result(Ran(classifier.scores(batch, per_run), time.perf_counter() - start, inline=True))
    except Exception as exc:  # handed to the pipeline, which rejects the inputs as model_error
        future.set_exception(exc)
    cost.record(len(batch), time.perf_counter() - start, inline=True)
    return future


async def run_one_by_one(
    worker: ModelWorker,
    classifier: Classifier,
    items: list[InputItem],
    batch: npt.NDArray[Any],
    failed: Callable[[InputItem, Exception], None],
) -> tuple[list[InputItem], npt.NDArray[Any], npt.NDArray[np.float32]]:
    """Run each input of `batch` alone; returns the inputs that ran, their rows and probabilities.
    `failed` hears about each input the model raised on."""
    kept: list[int] = []
    rows: list[npt.NDArray[np.float32]] = []
    for i, item in enumerate(items):
        try:
            rows.append(classifier.probabilities((await worker.submit(classifier, batch[i : i + 1])).scores))
            kept.append(i)
        except Exception as exc:  # as for a whole batch: this input is rejected, the rest go on
            failed(item, exc)
    if not kept:
        return [], batch[:0], np.empty((0, len(classifier.info.labels)), np.float32)
    return [items[i] for i in kept], batch[kept], np.concatenate(rows)
