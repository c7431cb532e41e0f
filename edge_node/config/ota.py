"""[ota]: which keys may sign commands, how downloads retry, and how a new model is judged."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from schemas.signing import SignatureError, parse_public_key


@dataclass(frozen=True)
class OtaConfig:
    state_dir: Path | None = None  # default: an "ota" dir next to the outbox file
    # key id -> base64 Ed25519 public key; env: EDGE_NODE__OTA__TRUSTED_KEYS="id=b64,id2=b64"
    trusted_keys: dict[str, str] = field(default_factory=dict)
    chunk_timeout_s: float = 10.0  # no new chunk for this long: ask again for the missing ones
    chunk_timeout_max_s: float = 120.0  # the backoff of those re-requests stops growing here
    max_clock_skew_s: float = 300.0  # tolerance on a command's issued_at / expires_at
    # A command issued this much earlier than the newest accepted one is refused as a replay.
    replay_window_s: float = 7 * 24 * 3600.0
    # Install (edge_node/ota). After a switch the new model is on probation this long: an exception
    # in its run, a higher error/rejection rate or a lower mean confidence than the old model's
    # (beyond the allowances below) switches back. Rates are compared only past
    # probation_min_inferences inputs.
    health_probation_s: float = 60.0
    probation_min_inferences: int = 50
    probation_max_confidence_drop: float = 0.10
    probation_max_error_rate_increase: float = 0.05
    # This many starts while a new model is still on probation (it keeps crashing the node) and
    # the node starts on the previous slot instead.
    crash_loop_limit: int = 3
    health_latency_runs: int = 50  # batch-1 runs timed by the health check for the p95
    health_max_latency_budget_ms: float = 0.0  # > 0: caps the command's latency_budget_ms
    # A rollout's shadow stage (a shadow_start command) runs its candidate beside the active model on
    # this share of the inputs, in its own thread; its answers are never used, only compared.
    shadow_share: float = 0.2

    def validate(self) -> None:
        for key_id, text in self.trusted_keys.items():
            try:
                parse_public_key(text)
            except SignatureError as exc:
                raise ValueError(
                    f"trusted_keys {key_id!r}: {exc}; paste the base64 printed by `cloud-bridge keys generate`"
                ) from None
        for ok, message in (
            (self.chunk_timeout_s > 0, "chunk_timeout_s must be > 0"),
            (self.chunk_timeout_max_s >= self.chunk_timeout_s, "chunk_timeout_max_s must be >= chunk_timeout_s"),
            (self.max_clock_skew_s >= 0, "max_clock_skew_s must be >= 0"),
            (self.replay_window_s > 0, "replay_window_s must be > 0"),
            (self.health_probation_s >= 0, "health_probation_s must be >= 0"),
            (self.probation_min_inferences >= 1, "probation_min_inferences must be at least 1"),
            (0 <= self.probation_max_confidence_drop <= 1, "probation_max_confidence_drop must be in [0, 1]"),
            (0 <= self.probation_max_error_rate_increase <= 1, "probation_max_error_rate_increase must be in [0, 1]"),
            (self.crash_loop_limit >= 1, "crash_loop_limit must be at least 1"),
            (0 <= self.shadow_share <= 1, "shadow_share must be in [0, 1]"),
            (self.health_latency_runs >= 1, "health_latency_runs must be at least 1"),
            (self.health_max_latency_budget_ms >= 0, "health_max_latency_budget_ms must be >= 0 (0: no cap)"),
        ):
            if not ok:
                raise ValueError(message)
