"""What each model did in this process, kept by the pipeline for the OTA installer: per-model
counters that probation judges a new model by, and the inputs run most recently.

Counters are per model (by sha256) and restart when a model becomes active, so probation judges
this activation only; the old model's counters up to the switch are its baseline
(edge_node/ota/health.py). The recent inputs are the health check's reference for a model that
ships none.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

# Recent batches kept for the OTA health check of a model that ships no reference inputs.
RECENT_BATCHES = 16


@dataclass(slots=True)
class ModelStats:
    """What one model did in this process, for probation after a switch (counts are inputs)."""

    inferences: int = 0
    errors: int = 0  # inputs lost to an exception raised by the model's run
    rejected: int = 0  # inputs refused before the model ran (shape, dtype, NaN, undecodable)
    confidence_sum: float = 0.0
    last_error: str = ""
    failed: asyncio.Event = field(default_factory=asyncio.Event)  # set on the first error

    @property
    def confidence_mean(self) -> float | None:
        return self.confidence_sum / self.inferences if self.inferences else None

    @property
    def error_rate(self) -> float | None:
        """Errors and rejections over every input the model was handed."""
        total = self.inferences + self.errors + self.rejected
        return (self.errors + self.rejected) / total if total else None

    def model_failed(self, inputs: int, exc: Exception) -> None:
        """The model raised in its run on `inputs` inputs: counted, and probation woken."""
        self.errors += inputs
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]
        self.failed.set()


class ModelActivity:
    """Every model's `ModelStats` by sha256, and the batches of checked inputs run most recently."""

    def __init__(self) -> None:
        self._stats: dict[str, ModelStats] = {}
        # The pipeline appends each batch it ran (the hot path: a plain deque, no call).
        self.recent: deque[npt.NDArray[Any]] = deque(maxlen=RECENT_BATCHES)

    def stats(self, sha256: str) -> ModelStats:
        """The counters of the model with this sha256 since it (last) became active."""
        return self._stats.setdefault(sha256, ModelStats())

    def activated(self, sha256: str) -> None:
        """The model became active (again): its counters start over."""
        self._stats.pop(sha256, None)

    def recent_inputs(self, limit: int = 64) -> npt.NDArray[Any] | None:
        """Up to `limit` checked inputs run most recently (None before the first batch)."""
        if not self.recent:
            return None
        return np.concatenate(list(self.recent))[-limit:]
