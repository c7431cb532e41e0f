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

from edge_node.routing.budget import RateBudget
from schemas.messages import SampleReason


@dataclass
class UncertaintySampler:
    entropy_threshold: float
    margin_threshold: float
    max_per_minute: int
    _budget: RateBudget = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._budget = RateBudget(self.max_per_minute)

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
        return self._budget.admit(now)

    def take_counts(self) -> tuple[int, int]:
        """(sent, skipped) since the last call."""
        return self._budget.take_counts()
