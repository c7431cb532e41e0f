"""The canary verdict: pure functions from window statistics to promote / wait / hold / roll back.

Nothing here touches the database, the clock or the network, so every rule is testable on synthetic
numbers. cloud_bridge/rollout/driver.py gathers the inputs (telemetry of the canary and control groups,
install acks) and acts on the verdict.

Metrics, each compared canary vs control over the stage window (telemetry `count`-weighted):

* escalation_rate = escalations.sent / count: fails when canary - control > max_escalation_rate_increase
* agreement = escalations.agreed / escalations.answered: fails when control - canary > max_agreement_drop
  (judged only once both sides have min_answered answered escalations)
* confidence_mean = confidence.mean weighted by count: fails when control - canary > max_confidence_drop
* rejection_rate = rejected / (count + rejected): fails when canary - control > max_rejection_rate_increase
* latency_p95_ms = edge_latency_ms.p95 (answers final at the edge: the model's own speed; latency_ms
  from devices that do not send it) weighted by count: fails when
  canary > control * max_latency_p95_ratio + latency_p95_slack_ms
* install failures = rejected/health_failed/rolled_back/failed/timeout acks of a stage's devices:
  fails when failed / devices > max_install_failure_rate

A window with fewer than `min_inferences` inferences on either side never promotes: the stage holds
(and says why) until enough data arrives. A crossed threshold rolls back as soon as both sides have
the minimum, without waiting for the window to end: a bad model should leave the canary early.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_type_hints

from cloud_bridge.drift.windows import own_latency
from cloud_bridge.errors import UsageError

Verdict = Literal["wait", "hold", "promote", "rollback"]

# Ack states that end an install attempt; everything else is still in progress.
INSTALL_OK = frozenset({"done"})
INSTALL_FAILED = frozenset({"rejected", "health_failed", "rolled_back", "failed", "timeout"})


@dataclass(frozen=True)
class Thresholds:
    """When a stage passes: the one definition of the thresholds' names, types and defaults.

    The `[rollout]` config section sets the bridge's defaults under the same names (a
    RolloutConfig carries them: cloud_bridge/rollout/driver.py `thresholds_from`); a rollout may
    override them for every stage or per stage (`cloud-bridge rollout start --thresholds`).
    Nothing here may import the config: the config builds on this class."""

    min_inferences: int = 200
    min_answered: int = 20
    max_escalation_rate_increase: float = 0.10
    max_agreement_drop: float = 0.10
    max_confidence_drop: float = 0.05
    max_rejection_rate_increase: float = 0.02
    max_latency_p95_ratio: float = 2.0
    latency_p95_slack_ms: float = 5.0
    max_install_failure_rate: float = 0.0
    # The shadow stage (cloud_bridge/rollout/shadow_policy.py): the candidate beside the active model.
    min_shadow_inputs: int = 200
    min_shadow_agreement: float = 0.5
    max_shadow_accuracy_drop: float = 0.02

    def with_overrides(self, overrides: Mapping[str, float]) -> Thresholds:
        typed: dict[str, Any] = {k: _typed(k, v) for k, v in overrides.items()}
        return dataclasses.replace(self, **typed)


THRESHOLD_NAMES = tuple(f.name for f in dataclasses.fields(Thresholds))
# Each threshold's type (int or float) as Thresholds declares it, resolved once.
_TYPES: dict[str, type[int] | type[float]] = get_type_hints(Thresholds)


def _typed(name: str, value: float) -> float | int:
    kind = _TYPES.get(name)
    if kind is None:
        raise UsageError(f"unknown threshold {name!r}: known thresholds are {', '.join(THRESHOLD_NAMES)}")
    return kind(value)


def parse_thresholds(specs: Iterable[str]) -> dict[str, dict[str, float]]:
    """Parse `--thresholds` values: "name=value[,name=value]" for every stage, "PCT:name=value" for the
    stage whose percentage is PCT, "shadow:name=value" for the shadow stage. Returns {"*": {...}, "25": {...}};
    raises UsageError naming the bad part."""
    out: dict[str, dict[str, float]] = {}
    for spec in specs:
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            stage, _, assignment = part.rpartition(":")
            name, sep, raw = assignment.partition("=")
            name = name.strip()
            if not sep:
                raise UsageError(f"threshold {part!r} must look like name=value or PCT:name=value")
            if stage and not (stage.strip().isdigit() or stage.strip() == "shadow"):
                raise UsageError(
                    f"threshold {part!r}: the stage before ':' must be a stage percentage like 25, or shadow"
                )
            try:
                value = float(raw)
            except ValueError:
                raise UsageError(f"threshold {part!r}: {raw!r} is not a number") from None
            _typed(name, value)
            out.setdefault(stage.strip() or "*", {})[name] = value
    return out


def thresholds_for(base: Thresholds, overrides: Mapping[str, Mapping[str, float]], stage: int) -> Thresholds:
    """The thresholds of one stage (an entry of the rollout's stages: a percentage, or minus the
    percentage for a shadow stage): defaults, then the rollout's "*" overrides, then the stage's own."""
    key = "shadow" if stage < 0 else str(stage)  # stages.threshold_key (policy imports no stages)
    return base.with_overrides(overrides.get("*", {})).with_overrides(overrides.get(key, {}))


@dataclass(frozen=True)
class GroupStats:
    """One group's telemetry over a window, summed or count-weighted."""

    devices: int = 0
    windows: int = 0
    inferences: int = 0
    rejected: int = 0
    escalations: int = 0
    answered: int = 0
    agreed: int = 0
    confidence_mean: float | None = None
    latency_p95_ms: float | None = None

    @property
    def escalation_rate(self) -> float | None:
        return self.escalations / self.inferences if self.inferences else None

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.answered if self.answered else None

    @property
    def rejection_rate(self) -> float | None:
        total = self.inferences + self.rejected
        return self.rejected / total if total else None

    def metrics(self) -> dict[str, float]:
        values = {
            "inferences": float(self.inferences),
            "escalation_rate": self.escalation_rate,
            "agreement": self.agreement,
            "confidence_mean": self.confidence_mean,
            "rejection_rate": self.rejection_rate,
            "latency_p95_ms": self.latency_p95_ms,
        }
        return {k: v for k, v in values.items() if v is not None}


def aggregate(bodies: Iterable[Mapping[str, Any]]) -> GroupStats:
    """Combine telemetry windows (the `body` JSON the registry stores) into one GroupStats.

    Quantiles cannot be merged exactly from per-window quantiles; the count-weighted mean of window
    p95s tracks a latency regression well enough to gate on, and is what the table above promises.
    """
    devices: set[str] = set()
    windows = count = rejected = sent = answered = agreed = 0
    conf_sum = conf_n = lat_sum = lat_n = 0.0
    for body in bodies:
        n = int(body.get("count", 0))
        windows += 1
        devices.add(str(body.get("device_id", "")))
        count += n
        rejected += int(body.get("rejected", 0))
        esc = body.get("escalations") or {}
        sent += int(esc.get("sent", 0))
        answered += int(esc.get("answered", 0))
        agreed += int(esc.get("agreed", 0))
        confidence = body.get("confidence")
        if confidence is not None and n:
            conf_sum += float(confidence["mean"]) * n
            conf_n += n
        latency = own_latency(body)
        if latency is not None and n:
            lat_sum += float(latency["p95"]) * n
            lat_n += n
    return GroupStats(
        devices=len(devices),
        windows=windows,
        inferences=count,
        rejected=rejected,
        escalations=sent,
        answered=answered,
        agreed=agreed,
        confidence_mean=conf_sum / conf_n if conf_n else None,
        latency_p95_ms=lat_sum / lat_n if lat_n else None,
    )


@dataclass(frozen=True)
class Check:
    """One metric compared: `passed` is None when it could not be judged (too few data)."""

    metric: str
    canary: float | None
    control: float | None
    limit: str
    passed: bool | None

    def describe(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4g}"

        return f"{self.metric}: canary {fmt(self.canary)} vs control {fmt(self.control)} (limit {self.limit})"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str
    checks: tuple[Check, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class InstallOutcome:
    """Where the devices of one stage are with their install."""

    total: int
    done: int
    failed: int
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def pending(self) -> int:
        return self.total - self.done - self.failed


def install_outcome(states: Iterable[str]) -> InstallOutcome:
    total = done = failed = 0
    failures: dict[str, int] = {}
    for state in states:
        total += 1
        if state in INSTALL_OK:
            done += 1
        elif state in INSTALL_FAILED:
            failed += 1
            failures[state] = failures.get(state, 0) + 1
    return InstallOutcome(total, done, failed, failures)


def judge_install(outcome: InstallOutcome, t: Thresholds) -> Decision:
    """Roll back as soon as failures exceed the rate; promote to watching when no device is pending."""
    rate = outcome.failed / outcome.total if outcome.total else 0.0
    check = Check(
        "install_failures", rate, 0.0, f"<= {t.max_install_failure_rate:g}", rate <= t.max_install_failure_rate
    )
    if not check.passed:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(outcome.failures.items()))
        return Decision(
            "rollback",
            f"install_failures: {outcome.failed}/{outcome.total} devices failed ({kinds}), "
            f"rate {rate:.2f} > max_install_failure_rate {t.max_install_failure_rate:g}",
            (check,),
        )
    if outcome.pending:
        return Decision("wait", f"installing: {outcome.done} done, {outcome.pending} pending", (check,))
    return Decision("promote", f"installed on {outcome.done}/{outcome.total} devices", (check,))


def _check_increase(metric: str, canary: float | None, control: float | None, limit: float) -> Check:
    if canary is None or control is None:
        return Check(metric, canary, control, f"+{limit:g}", None)
    return Check(metric, canary, control, f"canary - control <= {limit:g}", canary - control <= limit)


def _check_drop(metric: str, canary: float | None, control: float | None, limit: float) -> Check:
    if canary is None or control is None:
        return Check(metric, canary, control, f"-{limit:g}", None)
    return Check(metric, canary, control, f"control - canary <= {limit:g}", control - canary <= limit)


def metric_checks(canary: GroupStats, control: GroupStats, t: Thresholds) -> tuple[Check, ...]:
    enough_answers = canary.answered >= t.min_answered and control.answered >= t.min_answered
    agreement = (
        _check_drop("agreement", canary.agreement, control.agreement, t.max_agreement_drop)
        if enough_answers
        else Check("agreement", canary.agreement, control.agreement, f"needs {t.min_answered} answered", None)
    )
    latency_limit = f"canary <= control * {t.max_latency_p95_ratio:g} + {t.latency_p95_slack_ms:g} ms"
    if canary.latency_p95_ms is None or control.latency_p95_ms is None:
        latency = Check("latency_p95_ms", canary.latency_p95_ms, control.latency_p95_ms, latency_limit, None)
    else:
        bound = control.latency_p95_ms * t.max_latency_p95_ratio + t.latency_p95_slack_ms
        latency = Check(
            "latency_p95_ms",
            canary.latency_p95_ms,
            control.latency_p95_ms,
            latency_limit,
            canary.latency_p95_ms <= bound,
        )
    return (
        _check_increase(
            "escalation_rate", canary.escalation_rate, control.escalation_rate, t.max_escalation_rate_increase
        ),
        agreement,
        _check_drop("confidence_mean", canary.confidence_mean, control.confidence_mean, t.max_confidence_drop),
        _check_increase("rejection_rate", canary.rejection_rate, control.rejection_rate, t.max_rejection_rate_increase),
        latency,
    )


def judge_window(canary: GroupStats, control: GroupStats, t: Thresholds, *, window_elapsed: bool) -> Decision:
    """The verdict on a watched stage (all its devices installed)."""
    short = [
        f"{name} has {group.inferences} inferences < min_inferences {t.min_inferences}"
        for name, group in (("canary", canary), ("control", control))
        if group.inferences < t.min_inferences
    ]
    if short:
        verdict: Verdict = "hold" if window_elapsed else "wait"
        return Decision(verdict, "not enough data: " + "; ".join(short))
    checks = metric_checks(canary, control, t)
    failed = [c for c in checks if c.passed is False]
    if failed:
        return Decision("rollback", "; ".join(c.describe() for c in failed), checks)
    if not window_elapsed:
        return Decision("wait", "watching: every judged metric within limits so far", checks)
    judged = [c.metric for c in checks if c.passed]
    return Decision("promote", f"window passed ({', '.join(judged)} within limits)", checks)
