"""Where a batch should run: inline on the event loop when the model is tiny, else in a worker thread.

Handing a batch to a worker thread and back costs ~70 µs of wake-ups (more on a loaded machine),
ten times what the demo edge model's `run` costs at batch 1. Blocking the loop for a few tens of
microseconds harms nothing (MQTT keep-alives are seconds apart), so a batch whose *measured* cost
is under `budget_s` runs inline. The cost is measured per batch-size bucket (powers of two), as a
moving average of what that bucket actually took, inline or in the worker, so a model that turns
slow (a bigger model switched in, a throttled CPU) goes back to the worker by itself. A bucket never
measured runs in the worker first: an unknown model never blocks the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_INLINE_BUDGET_S = 100e-6
_ALPHA = 0.2  # weight of the newest measurement in the moving average


@dataclass
class RunCost:
    """Measured `predict` seconds per batch-size bucket, for the model identified by `key`."""

    budget_s: float = DEFAULT_INLINE_BUDGET_S
    key: object = None
    _by_bucket: dict[int, float] = field(default_factory=dict)

    @staticmethod
    def _bucket(rows: int) -> int:
        return rows.bit_length()

    def for_model(self, key: object) -> RunCost:
        """Forget the measurements when the model changed (an OTA switch)."""
        if key is not self.key:
            self.key = key
            self._by_bucket.clear()
        return self

    def inline(self, rows: int) -> bool:
        """Whether a batch of `rows` is known to cost less than the budget."""
        cost = self._by_bucket.get(self._bucket(rows))
        return cost is not None and cost < self.budget_s

    def record(self, rows: int, seconds: float) -> None:
        bucket = self._bucket(rows)
        old = self._by_bucket.get(bucket)
        self._by_bucket[bucket] = seconds if old is None else old + _ALPHA * (seconds - old)

    def estimate(self, rows: int) -> float | None:
        """The moving average for this batch size's bucket, if measured."""
        return self._by_bucket.get(self._bucket(rows))
