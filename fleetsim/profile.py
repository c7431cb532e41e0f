"""What every simulated device does: the issue's realistic profile by default."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """A device at `hz` inferences per second finishes most inputs at the edge; `escalate_share` are
    unsure and asked of the cloud (escalate/1, answered, or final at the edge after
    `escalation_timeout_s`); unsure inputs are also sent as samples, `sample_share` of all inputs at
    most and within the edge's budget of `samples_per_minute`. Final answers wait up to
    `results_delay_s` (the edge's `[uplink] results_max_delay_s`) or `results_max_answers` answers to
    share a result/2 message; a telemetry window closes every `telemetry_s` (the edge's default is 30 s;
    the issue's profile says 10). `drift_share` of the devices see their inputs drift from
    `drift_after_s` into the run."""

    hz: float = 1.0
    telemetry_s: float = 10.0
    escalate_share: float = 0.05
    sample_share: float = 0.02
    samples_per_minute: int = 3
    results_delay_s: float = 10.0
    results_max_answers: int = 256
    escalation_timeout_s: float = 2.0
    drift_share: float = 0.01
    drift_after_s: float = 30.0

    def problems(self) -> list[str]:
        """What makes this profile unusable, one phrase each (empty when it is fine)."""
        out = []
        if not 0 < self.hz <= 1000:
            out.append(f"--hz {self.hz:g} must be above 0 and at most 1000")
        if self.telemetry_s < 1:
            out.append(f"--telemetry-s {self.telemetry_s:g} must be at least 1")
        for name, share in (("--escalations", self.escalate_share), ("--sample-share", self.sample_share)):
            if not 0 <= share <= 1:
                out.append(f"{name} {share:g} must be a share between 0 and 1")
        if not 0 <= self.drift_share <= 1:
            out.append(f"--drift-share {self.drift_share:g} must be a share between 0 and 1")
        if self.samples_per_minute < 0:
            out.append(f"--samples-per-minute {self.samples_per_minute} must not be negative")
        if self.results_delay_s < 0:
            out.append(f"--results-delay-s {self.results_delay_s:g} must not be negative")
        if not 1 <= self.results_max_answers <= 1024:
            out.append(f"--results-max-answers {self.results_max_answers} must be 1-1024 (result/2's limit)")
        if self.escalation_timeout_s <= 0:
            out.append(f"--timeout {self.escalation_timeout_s:g} must be above 0")
        return out
