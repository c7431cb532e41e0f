"""Where a batch should run: inline on the event loop when the model is tiny, else in a worker thread.

Handing a batch to a worker thread and back costs ~70 µs of wake-ups on bare metal and ~125 µs
wall plus ~140 µs of CPU on the 2-vCPU VM this was measured on: more than the demo edge model's
`run` at batch 1 or 64. Blocking the loop for a fraction of a millisecond harms nothing (MQTT
keep-alives are seconds apart), so a batch whose *measured* inline cost is under `budget_s` runs
inline.

The cost is measured per batch-size bucket (powers of two) as the least of that bucket's last
RECENT runs: the least filters out a preempted run, and a model that turns slow (a throttled CPU)
still goes back to the worker within RECENT batches. A bucket never measured runs in the worker
first, so an unknown model never blocks the loop. Runs in the worker overstate the model's cost
(they also pay for taking the GIL back from a busy loop, tens of microseconds of futex wake-ups on
a VM), so a bucket whose worker runs cost under `probe_s` is tried inline for RECENT runs, and
from then on its inline runs decide. A run right after the loop sat idle can cost several times a
warm one on a VM, so one run never decides (a node fed at a low rate would flap between the two and
its latency with it), and a bucket sent back to the worker is tried again after REPROBE worker
runs, twice as many after each try that failed (up to MAX_REPROBE): a try blocks the loop for RECENT
runs, which for a model just over the budget (a 0.4 ms CNN) would otherwise cost ~6% of its
throughput, the model idling in the worker while the loop runs it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

DEFAULT_INLINE_BUDGET_S = 250e-6
DEFAULT_PROBE_S = 1e-3  # the longest a single inline probe may block the loop
RECENT = 16  # runs per bucket whose least cost is the estimate
REPROBE = 256  # worker runs of a bucket before it is tried inline again...
MAX_REPROBE = 16 * REPROBE  # ...doubled after each failed try, up to this


@dataclass
class _Bucket:
    inline: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    worker: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    since_inline: int = 0  # worker runs since the last inline one
    probing: int = 0  # inline runs still to go in the current try
    reprobe: int = REPROBE  # worker runs before the next try


@dataclass
class RunCost:
    """Measured `predict` seconds per batch-size bucket, for the model identified by `key`."""

    budget_s: float = DEFAULT_INLINE_BUDGET_S
    probe_s: float = DEFAULT_PROBE_S
    key: object = None
    _buckets: dict[int, _Bucket] = field(default_factory=dict)
    _per_row: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))  # seconds / rows

    @staticmethod
    def _bucket_of(rows: int) -> int:
        return rows.bit_length()

    def for_model(self, key: object) -> RunCost:
        """Forget the measurements when the model changed (an OTA switch)."""
        if key is not self.key:
            self.key = key
            self._buckets.clear()
            self._per_row.clear()
        return self

    def inline(self, rows: int) -> bool:
        """Whether a batch of `rows` should run inline: in a try, measured inline under the budget,
        or due for a try (never tried, or `reprobe` worker runs since the last) and cheap enough in
        the worker."""
        bucket = self._buckets.get(self._bucket_of(rows))
        if bucket is None:
            return False
        if bucket.probing or (bucket.inline and min(bucket.inline) < self.budget_s):
            return True
        due = not bucket.inline or bucket.since_inline >= bucket.reprobe
        if due and bucket.worker and min(bucket.worker) < self.probe_s:
            bucket.inline.clear()  # judge by this try's runs only
            bucket.probing = RECENT
            return True
        return False

    def record(self, rows: int, seconds: float, *, inline: bool) -> None:
        bucket = self._buckets.setdefault(self._bucket_of(rows), _Bucket())
        self._per_row.append(seconds / max(rows, 1))
        if inline:
            bucket.inline.append(seconds)
            bucket.since_inline = 0
            trying = bucket.probing > 0
            # A run over the probe limit ends the try at once: the loop must not block that long again.
            bucket.probing = max(bucket.probing - 1, 0) if seconds < self.probe_s else 0
            if trying and not bucket.probing:  # the try ended: its runs decide
                won = min(bucket.inline) < self.budget_s
                bucket.reprobe = REPROBE if won else min(2 * bucket.reprobe, MAX_REPROBE)
        else:
            bucket.worker.append(seconds)
            bucket.since_inline += 1

    def per_row(self) -> float | None:
        """The least recent cost per input of any run, inline or not (None before the first)."""
        return min(self._per_row) if self._per_row else None

    def estimate(self, rows: int) -> float | None:
        """The least recent cost of this batch size's bucket (inline runs if any), if measured."""
        bucket = self._buckets.get(self._bucket_of(rows))
        if bucket is None:
            return None
        runs = bucket.inline or bucket.worker
        return min(runs) if runs else None
