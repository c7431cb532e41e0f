"""The model worker thread: runs predict off the loop, in order, reports errors, and closes cleanly."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from demokit.models import DemoModel
from edge_node.inference.model import Classifier
from edge_node.inference.worker import ModelWorker


async def test_runs_in_its_own_thread_in_order_and_times_the_model(demo_models: dict[str, DemoModel]) -> None:
    classifier = Classifier.load(demo_models["edge"].path)
    worker = ModelWorker()
    batches = [np.random.default_rng(i).random((i + 1, 64), dtype=np.float32) * 16 for i in range(5)]
    try:
        runs = await asyncio.gather(*(worker.submit(classifier, b) for b in batches))
    finally:
        worker.close()
    for batch, ran in zip(batches, runs, strict=True):
        np.testing.assert_allclose(classifier.probabilities(ran.scores), classifier.predict(batch), rtol=1e-6)
        assert ran.seconds > 0 and not ran.inline
    assert threading.current_thread().name != "inference"


async def test_a_model_error_reaches_the_awaiting_batch_and_the_worker_goes_on(
    demo_models: dict[str, DemoModel],
) -> None:
    classifier = Classifier.load(demo_models["edge"].path)
    worker = ModelWorker()
    try:
        with pytest.raises(Exception, match=r"(?i)invalid|shape|dimension"):
            await worker.submit(classifier, np.zeros((1, 3), np.float32))  # the model takes 64 features
        ran = await worker.submit(classifier, np.zeros((1, 64), np.float32))
        assert classifier.probabilities(ran.scores).shape == (1, 10)
    finally:
        worker.close()


async def test_close_cancels_queued_runs_and_refuses_new_ones(demo_models: dict[str, DemoModel]) -> None:
    classifier = Classifier.load(demo_models["edge"].path)
    worker = ModelWorker()
    futures = [worker.submit(classifier, np.zeros((256, 64), np.float32)) for _ in range(50)]
    worker.close()
    await asyncio.wait(futures, timeout=10)
    assert all(f.done() for f in futures)
    assert any(f.cancelled() for f in futures), "queued runs must not all run after close"
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(classifier, np.zeros((1, 64), np.float32))
