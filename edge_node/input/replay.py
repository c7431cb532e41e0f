"""The demo's input source: the digits held-out set replayed at a steady rate, optionally drifting.

The only part of the node that uses the demo kit (demokit/: scikit-learn's bundled digits and the
drift transforms). It imports it when a replay source is made, so a node with another source (and
a device without the `demo` extra installed) never loads it; and the demo kit reads the digits
and drifts them with numpy alone, so a replaying node loads neither scikit-learn nor scipy (with
them it weighed 170 MiB instead of 90, and started 0.9 s later: bench/footprint.py). The data is
read when the source starts running, after the link began to connect.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_node.config import ReplaySourceConfig
from edge_node.errors import ConfigError
from edge_node.input.intake import InputItem, Intake
from edge_node.input.sources import InputIds

log = logging.getLogger(__name__)


class ReplaySource:
    """The digits held-out set replayed at `rate_hz`, with optional drift injected after `drift_after`."""

    def __init__(self, queue: Intake, ids: InputIds, config: ReplaySourceConfig) -> None:
        # Imported here, not at the top: the demo kit is not on a device, and only a node
        # configured with [source] kind = "replay" needs it. It reads the digits with numpy and
        # rotates them with numpy, so even that node loads neither scikit-learn nor scipy.
        from demokit import dataset, drift

        self._dataset = dataset
        self._drift = drift
        self._queue = queue
        self._ids = ids
        self.config = config
        self.labels: tuple[str, ...] = dataset.LABELS
        empty = (np.empty((0, dataset.NUM_FEATURES), np.float32), np.empty(0, np.int64))
        self._clean: tuple[npt.NDArray[Any], npt.NDArray[Any]] = empty
        self._drifted: tuple[npt.NDArray[Any], npt.NDArray[Any]] = empty
        self.emitted = 0

    def _load(self) -> None:
        """The held-out split and its drifted copy (~40 ms)."""
        config = self.config
        try:
            split = self._dataset.load_digits_split(seed=config.seed)
        except FileNotFoundError as exc:
            raise ConfigError(f'[source] kind = "replay": {exc}') from None
        self.labels = split.labels
        rng = np.random.default_rng(config.seed)
        self._clean = (np.asarray(split.X_test), np.asarray(split.y_test))
        strength = config.drift_strength or self._drift.DEFAULT_STRENGTH[config.drift]
        spec = self._drift.DriftSpec(kind=config.drift, strength=strength)
        self._drifted = spec.apply(self._clean[0], self._clean[1], rng, rotate_backend="numpy")

    def _pick(self, n: int) -> tuple[npt.NDArray[Any], str, str]:
        drifting = self.config.drift != "none" and n >= self.config.drift_after
        X, y = self._drifted if drifting else self._clean
        i = n % len(y)
        return X[i], self.labels[int(y[i])], f"replay:{'drift:' if drifting else ''}{i}"

    def _items(self, due: int, now: float) -> list[InputItem]:
        """The inputs due by now that were not emitted yet (many at once when the rate is high)."""
        items: list[InputItem] = []
        for n in range(self.emitted, due):
            x, truth, ref = self._pick(n)
            items.append(InputItem(self._ids.next(), x, now, truth=truth, source_ref=ref))
        self.emitted = due
        return items

    async def run(self) -> None:
        # In the task's first step, with the first inputs: a node stopped right after it started
        # still answers (and drains) those. Not in a thread: a stop landing during the read would
        # leave the node without a single input. The link's task, started before, is connecting.
        self._load()
        loop = asyncio.get_running_loop()
        period = 1.0 / self.config.rate_hz
        size = len(self._clean[1])
        total = self.config.limit or (None if self.config.loop else size)
        start = loop.time()
        while total is None or self.emitted < total:
            # Emit every item that is due by now (in one hand-over, at most what the intake holds,
            # so a pipeline that fell behind does not make the source build a backlog in memory),
            # then sleep until the next one: high rates need no sleep per item, and the schedule
            # does not drift with processing time.
            due = min(int((loop.time() - start) / period) + 1, self.emitted + self._queue.maxsize)
            if total is not None:
                due = min(due, total)
            if self.emitted < due:
                await self._queue.put_many(self._items(due, loop.time()))
            await asyncio.sleep(max(0.0, start + self.emitted * period - loop.time()))
        log.info("replay finished emitted=%d", self.emitted)
