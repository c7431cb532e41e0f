"""Reconnect backoff shared by every MQTT client of the project: exponential, with full jitter.

Full jitter (a delay drawn uniformly from [minimum, cap]) spreads a fleet that lost the broker at
the same moment over the whole interval, so a restarted broker is not hit by every device at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_MAX_DOUBLINGS = 32  # keeps 2**attempt finite; the cap is reached long before


@dataclass
class Backoff:
    """Delays between connection attempts: `next_delay()` after each failure, `reset()` on success.

    Attempt n (from 0) waits a uniform draw from [minimum, min(maximum, minimum * 2**n)].
    """

    minimum: float
    maximum: float
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.minimum <= self.maximum:
            raise ValueError(f"backoff needs 0 < minimum <= maximum, got {self.minimum} and {self.maximum}")

    def next_delay(self, *, hold_off: bool = False) -> float:
        """The next delay in seconds; `hold_off` (e.g. refused credentials) waits the maximum."""
        if hold_off:
            return self.maximum
        cap = min(self.maximum, self.minimum * (2**self.attempt))
        self.attempt = min(self.attempt + 1, _MAX_DOUBLINGS)
        return self.rng.uniform(self.minimum, cap) if cap > self.minimum else self.minimum

    def reset(self) -> None:
        self.attempt = 0
