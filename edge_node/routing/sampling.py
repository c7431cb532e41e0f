"""Uncertainty sampling within an uplink budget.

An input is a labeling candidate when its entropy reaches `entropy_threshold` or its top-2
margin is at most `margin_threshold`. Candidates spend tokens from a bucket refilled at
`max_per_minute` per minute (burst up to one minute's worth); a candidate finding the bucket
empty is skipped and counted, so the labeling team can see how much was left on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from schemas.messages import SampleReason


@dataclass
class UncertaintySampler:
    entropy_threshold: float
    margin_threshold: float
    max_per_minute: int
    sent: int = 0
    skipped_budget: int = 0
    _tokens: float = field(default=-1.0, repr=False)
    _last: float | None = field(default=None, repr=False)

    def candidates(self, entropy: npt.NDArray[np.float32], margin: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
        by_entropy = entropy >= np.float32(self.entropy_threshold)
        by_margin = margin <= np.float32(self.margin_threshold)
        return by_entropy | by_margin

    def reasons(self, entropy: float, margin: float) -> list[SampleReason]:
        out: list[SampleReason] = []
        if entropy >= np.float32(self.entropy_threshold):
            out.append("entropy")
        if margin <= np.float32(self.margin_threshold):
            out.append("margin")
        return out

    def admit(self, now: float) -> bool:
        """Spend one token if the budget allows at time `now` (monotonic seconds)."""
        if self.max_per_minute <= 0:
            self.skipped_budget += 1
            return False
        capacity = float(self.max_per_minute)
        if self._last is None:
            self._tokens = capacity
        else:
            self._tokens = min(capacity, self._tokens + (now - self._last) * capacity / 60.0)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.sent += 1
            return True
        self.skipped_budget += 1
        return False

    def take_counts(self) -> tuple[int, int]:
        """(sent, skipped) since the last call."""
        counts = (self.sent, self.skipped_budget)
        self.sent = self.skipped_budget = 0
        return counts
