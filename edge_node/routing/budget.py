"""A rate budget: a token bucket refilled at `per_minute` tokens a minute, holding at most one
minute's worth, so a burst after a quiet spell may spend a minute's budget at once but the long-run
rate never exceeds `per_minute`.

Sampling and escalation each spend their own: on a billed link they are the two channels whose
volume grows with how unsure the model is, and a drifting device is unsure all day.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RateBudget:
    per_minute: float
    admitted: int = 0
    refused: int = 0
    _tokens: float = field(default=0.0, repr=False)
    _last: float | None = field(default=None, repr=False)

    def admit(self, now: float) -> bool:
        """Spend one token if the budget allows at time `now` (monotonic seconds); counts either way."""
        if self.per_minute <= 0:
            self.refused += 1
            return False
        capacity = float(self.per_minute)
        if self._last is None:
            self._tokens = capacity
        else:
            self._tokens = min(capacity, self._tokens + max(0.0, now - self._last) * capacity / 60.0)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.admitted += 1
            return True
        self.refused += 1
        return False

    def take_counts(self) -> tuple[int, int]:
        """(admitted, refused) since the last call."""
        counts = (self.admitted, self.refused)
        self.admitted = self.refused = 0
        return counts
