"""The shadow stage's verdict: pure functions from the devices' `shadow` telemetry to pass / wait / fail.

In a shadow stage the candidate runs on the stage's devices beside their active model, on a sampled
share of live inputs, its answers never used (edge_node/inference/shadow.py); each telemetry window
carries its counts (schemas ShadowStats). The stage is judged on the candidate's windows summed over
the stage's devices since watching began, against the active model on the same inputs (or, for
confidence and latency, the same devices' own telemetry), with the thresholds of
cloud_bridge/rollout/policy.py `Thresholds` (defined there once, set in `[rollout]`):

* inputs < min_shadow_inputs: wait (hold once the window is over)
* errors (the candidate raised): fails at any count
* agreement with the active model = agreed / inputs: fails when < min_shadow_agreement
* accuracy on labeled inputs (truth known): fails when active - shadow > max_shadow_accuracy_drop
  (judged from min_answered labeled inputs)
* agreement with the cloud where an escalation was answered: fails when active - shadow >
  max_agreement_drop (judged from min_answered answered)
* confidence_mean: fails when active - shadow > max_confidence_drop
* latency_p95_ms: fails when shadow > active * max_latency_p95_ratio + latency_p95_slack_ms

Like a canary stage, a crossed threshold fails at once; a full window within limits passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cloud_bridge.rollout.policy import Check, Decision, GroupStats, Thresholds, Verdict

_COUNTS = (
    "inputs",
    "skipped",
    "errors",
    "agreed",
    "labeled",
    "correct",
    "active_correct",
    "cloud_answered",
    "cloud_agreed",
    "active_cloud_agreed",
)


@dataclass(frozen=True)
class ShadowGroup:
    """The candidate's shadow counts over the stage's devices and windows."""

    devices: int = 0
    windows: int = 0
    inputs: int = 0
    skipped: int = 0
    errors: int = 0
    agreed: int = 0
    labeled: int = 0
    correct: int = 0
    active_correct: int = 0
    cloud_answered: int = 0
    cloud_agreed: int = 0
    active_cloud_agreed: int = 0
    confidence_mean: float | None = None
    latency_p95_ms: float | None = None

    def metrics(self) -> dict[str, float]:
        def ratio(a: int, b: int) -> float | None:
            return a / b if b else None

        values = {
            "shadow_inputs": float(self.inputs),
            "shadow_skipped": float(self.skipped),
            "shadow_errors": float(self.errors),
            "shadow_agreement": ratio(self.agreed, self.inputs),
            "shadow_accuracy": ratio(self.correct, self.labeled),
            "active_accuracy": ratio(self.active_correct, self.labeled),
            "shadow_cloud_agreement": ratio(self.cloud_agreed, self.cloud_answered),
            "active_cloud_agreement": ratio(self.active_cloud_agreed, self.cloud_answered),
            "shadow_confidence_mean": self.confidence_mean,
            "shadow_latency_p95_ms": self.latency_p95_ms,
        }
        return {k: v for k, v in values.items() if v is not None}


def aggregate_shadow(bodies: Iterable[Mapping[str, Any]], sha256: str) -> ShadowGroup:
    """Sum the `shadow` field of telemetry bodies whose shadow model is the candidate `sha256`."""
    sums = dict.fromkeys(_COUNTS, 0)
    devices: set[str] = set()
    windows = 0
    conf_sum = conf_n = lat_sum = lat_n = 0.0
    for body in bodies:
        shadow = body.get("shadow")
        if not shadow or (shadow.get("model") or {}).get("sha256") != sha256:
            continue
        windows += 1
        devices.add(str(body.get("device_id", "")))
        for key in _COUNTS:
            sums[key] += int(shadow.get(key, 0))
        n = int(shadow.get("inputs", 0))
        if shadow.get("confidence_mean") is not None and n:
            conf_sum += float(shadow["confidence_mean"]) * n
            conf_n += n
        if shadow.get("latency_p95_ms") is not None and n:
            lat_sum += float(shadow["latency_p95_ms"]) * n
            lat_n += n
    return ShadowGroup(
        devices=len(devices),
        windows=windows,
        confidence_mean=conf_sum / conf_n if conf_n else None,
        latency_p95_ms=lat_sum / lat_n if lat_n else None,
        **sums,
    )


def _drop(metric: str, shadow: float | None, active: float | None, limit: float, why: str = "") -> Check:
    if shadow is None or active is None:
        return Check(metric, shadow, active, why or f"active - shadow <= {limit:g}", None)
    return Check(metric, shadow, active, f"active - shadow <= {limit:g}", active - shadow <= limit)


def shadow_checks(s: ShadowGroup, active: GroupStats, t: Thresholds) -> tuple[Check, ...]:
    """Each Check's `canary` is the shadow's value and `control` the active model's."""
    agreement = s.agreed / s.inputs if s.inputs else None
    acc = (s.correct / s.labeled, s.active_correct / s.labeled) if s.labeled >= t.min_answered else (None, None)
    cloud = (
        (s.cloud_agreed / s.cloud_answered, s.active_cloud_agreed / s.cloud_answered)
        if s.cloud_answered >= t.min_answered
        else (None, None)
    )
    needs = f"needs {t.min_answered}"
    latency_limit = f"shadow <= active * {t.max_latency_p95_ratio:g} + {t.latency_p95_slack_ms:g} ms"
    if s.latency_p95_ms is None or active.latency_p95_ms is None:
        latency = Check("latency_p95_ms", s.latency_p95_ms, active.latency_p95_ms, latency_limit, None)
    else:
        bound = active.latency_p95_ms * t.max_latency_p95_ratio + t.latency_p95_slack_ms
        latency = Check(
            "latency_p95_ms", s.latency_p95_ms, active.latency_p95_ms, latency_limit, s.latency_p95_ms <= bound
        )
    return (
        Check("shadow_errors", float(s.errors), 0.0, "== 0", s.errors == 0),
        Check(
            "agreement_with_active",
            agreement,
            1.0,
            f">= {t.min_shadow_agreement:g}",
            None if agreement is None else agreement >= t.min_shadow_agreement,
        ),
        _drop("accuracy", acc[0], acc[1], t.max_shadow_accuracy_drop, f"{needs} labeled"),
        _drop("cloud_agreement", cloud[0], cloud[1], t.max_agreement_drop, f"{needs} answered"),
        _drop("confidence_mean", s.confidence_mean, active.confidence_mean, t.max_confidence_drop),
        latency,
    )


def judge_shadow(s: ShadowGroup, active: GroupStats, t: Thresholds, *, window_elapsed: bool) -> Decision:
    """pass = "promote" (on to the next stage), fail = "rollback" (the candidate is never switched in)."""
    if s.inputs < t.min_shadow_inputs:
        verdict: Verdict = "hold" if window_elapsed else "wait"
        return Decision(
            verdict, f"not enough data: shadow ran {s.inputs} inputs < min_shadow_inputs {t.min_shadow_inputs}"
        )
    checks = shadow_checks(s, active, t)
    failed = [c for c in checks if c.passed is False]
    if failed:
        return Decision("rollback", "shadow " + "; ".join(_describe(c) for c in failed), checks)
    if not window_elapsed:
        return Decision("wait", "shadowing: every judged metric within limits so far", checks)
    judged = [c.metric for c in checks if c.passed]
    return Decision("promote", f"shadow passed ({', '.join(judged)} within limits)", checks)


def _describe(c: Check) -> str:
    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4g}"

    return f"{c.metric}: shadow {fmt(c.canary)} vs active {fmt(c.control)} (limit {c.limit})"
