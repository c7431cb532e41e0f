"""Is a model fit to serve? The check before an OTA switch, and the probation verdict after it.

Before the switch (`check_health`, blocking: run it in a worker thread while the live model keeps
serving), the candidate must

* take the same input (shape, dtype) and give the same labels, in the same order, as the model it
  replaces: the sources, escalation answers (matched by class index) and telemetry depend on both;
* run its reference inputs, as one batch and one by one, to finite probability rows. The reference
  is the `health_reference` metadata the model ships (inputs and the probabilities its builder got
  for them; the demo models carry one), else the inputs the node ran recently;
* stay within `tolerance` (max absolute difference per probability) of the shipped probabilities:
  this catches a file that loads but computes something else than what was built and tested
  (a broken quantization, a different runtime, weights that do not match the metadata);
* answer batch-1 within the latency budget, at the 95th percentile.

After the switch, `probation_verdict` compares the new model's live counters against what the old
model did before the switch (`Baseline`): any exception in its run, a higher error/rejection rate
or a lower mean confidence than allowed means it goes back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from edge_node.errors import InputRejected, Unhealthy
from edge_node.inference.model import Classifier, ModelInfo
from edge_node.inference.stats import ModelStats
from schemas.modelcard import HealthReference

REFERENCE_KEY = "health_reference"
# Probability rows must sum to 1 within this (float32 softmax rounding, quantized models).
SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class HealthPolicy:
    tolerance: float  # max |p - expected| per probability
    latency_budget_ms: float  # batch-1 p95
    latency_runs: int = 50


@dataclass(frozen=True)
class HealthReport:
    ok: bool
    reason: str  # why it failed, or what it passed
    reference: str  # "metadata", "recent inputs" or "none"
    max_abs_diff: float | None = None
    latency_p95_ms: float | None = None


@dataclass(frozen=True)
class _Reference:
    inputs: npt.NDArray[Any]
    expected: npt.NDArray[np.float64] | None
    source: str


def check_health(
    candidate: Classifier, current: Classifier, recent: npt.NDArray[Any] | None, policy: HealthPolicy
) -> HealthReport:
    """Run every check on `candidate` (blocking); the report says the first failure or what passed."""
    source = "none"
    diff: float | None = None
    try:
        check_compatible(candidate.info, current.info)
        reference = reference_inputs(candidate.info, recent)
        source = reference.source
        probs = _run(candidate, reference.inputs)
        if reference.expected is not None:
            diff = _check_tolerance(probs, reference.expected, policy.tolerance)
        p95 = _latency_p95_ms(candidate, reference.inputs, policy)
    except Unhealthy as exc:
        return HealthReport(False, str(exc), source, diff)
    summary = f"{len(reference.inputs)} reference input(s) from {source}, batch-1 p95 {p95:.3f} ms"
    if diff is not None:
        summary += f", max difference {diff:.2g} (tolerance {policy.tolerance})"
    return HealthReport(True, summary, source, diff, p95)


def check_compatible(candidate: ModelInfo, current: ModelInfo) -> None:
    """Raise Unhealthy unless `candidate` takes the same inputs and gives the same labels as `current`."""
    if candidate.feature_shape != current.feature_shape or candidate.input_dtype != current.input_dtype:
        raise Unhealthy(
            f"input {list(candidate.feature_shape)} {candidate.input_dtype} does not match what the node "
            f"feeds its current model: {list(current.feature_shape)} {current.input_dtype}"
        )
    if candidate.labels != current.labels:
        raise Unhealthy(
            f"labels {_short(candidate.labels)} differ from the current model's {_short(current.labels)}; "
            "a new model must keep the classes and their order"
        )


def reference_inputs(info: ModelInfo, recent: npt.NDArray[Any] | None) -> _Reference:
    """The shipped reference (inputs + expected probabilities), else recent inputs, else one zero input."""
    shipped = info.card.health_reference
    if shipped is not None:
        return _shaped_reference(shipped, info)
    if recent is not None and len(recent):
        return _Reference(np.asarray(recent, dtype=info.input_dtype), None, "recent inputs")
    return _Reference(np.zeros((1, *info.feature_shape), dtype=info.input_dtype), None, "none")


def _shaped_reference(shipped: HealthReference, info: ModelInfo) -> _Reference:
    """The shipped reference as arrays the model takes (its JSON was decoded when the model loaded)."""
    try:
        inputs = np.asarray(shipped.inputs, dtype=np.float64)
        expected = np.asarray(shipped.probabilities, dtype=np.float64)
    except (TypeError, ValueError) as exc:  # ragged lists, or values that are not numbers
        raise Unhealthy(f"metadata {REFERENCE_KEY!r} does not hold arrays of numbers: {exc}") from None
    n = len(inputs)
    width = int(np.prod(info.feature_shape))
    if n == 0 or inputs.size != n * width or expected.shape != (n, len(info.labels)):
        raise Unhealthy(
            f"metadata {REFERENCE_KEY!r} holds inputs of shape {list(inputs.shape)} and probabilities of shape "
            f"{list(expected.shape)}; the model takes {list(info.feature_shape)} and has {len(info.labels)} labels"
        )
    shaped = inputs.reshape(n, *info.feature_shape).astype(info.input_dtype)
    return _Reference(shaped, expected, "metadata")


def _run(candidate: Classifier, inputs: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Probabilities for the batch, checked to be finite distributions and equal to one-by-one runs."""
    try:
        checked = np.stack([candidate.check_input(x) for x in inputs])
        probs = candidate.predict(checked)
        singles = np.concatenate([candidate.predict(checked[i : i + 1]) for i in range(len(checked))])
    except InputRejected as exc:
        raise Unhealthy(f"a reference input does not fit the model: {exc}") from None
    except Exception as exc:  # ORT raises several unrelated types; any of them fails the check
        raise Unhealthy(f"the model raised on its reference inputs: {type(exc).__name__}: {exc}") from None
    expected_shape = (len(checked), len(candidate.info.labels))
    if probs.shape != expected_shape:
        raise Unhealthy(f"the model gave outputs of shape {list(probs.shape)}, expected {list(expected_shape)}")
    if not np.isfinite(probs).all():
        raise Unhealthy(f"the model gave {int((~np.isfinite(probs)).sum())} NaN/inf output value(s)")
    sums = probs.sum(axis=1, dtype=np.float64)
    if (probs < -SUM_TOLERANCE).any() or np.abs(sums - 1.0).max() > SUM_TOLERANCE:
        raise Unhealthy(f"the outputs are not probability rows (row sums {_short(sums.round(4).tolist())})")
    if np.abs(singles - probs).max() > SUM_TOLERANCE:
        raise Unhealthy("the model gives different outputs for the same input alone and in a batch")
    return probs


def _check_tolerance(probs: npt.NDArray[np.float32], expected: npt.NDArray[np.float64], tolerance: float) -> float:
    diff = np.abs(probs.astype(np.float64) - expected)
    worst = float(diff.max())
    if worst > tolerance:
        row = int(diff.max(axis=1).argmax())
        raise Unhealthy(
            f"outputs differ from the shipped reference by up to {worst:.3f} (tolerance {tolerance}), "
            f"worst on reference input {row}"
        )
    return worst


def _latency_p95_ms(candidate: Classifier, inputs: npt.NDArray[Any], policy: HealthPolicy) -> float:
    """Batch-1 p95 over `latency_runs` calls; stops as soon as more than 5% are over the budget."""
    runs = max(policy.latency_runs, 1)
    allowed_over = int(runs * 0.05)
    times: list[float] = []
    over = 0
    for i in range(runs):
        x = inputs[i % len(inputs) : i % len(inputs) + 1]
        start = time.perf_counter()
        try:
            candidate.predict(x)
        except Exception as exc:  # it ran these inputs before; failing now is as bad as failing then
            raise Unhealthy(f"the model raised while timed: {type(exc).__name__}: {exc}") from None
        elapsed = (time.perf_counter() - start) * 1000.0
        times.append(elapsed)
        over += elapsed > policy.latency_budget_ms
        if over > allowed_over:
            raise Unhealthy(
                f"batch-1 latency is over the budget of {policy.latency_budget_ms} ms in {over} of {i + 1} "
                f"runs (last {elapsed:.2f} ms), so its p95 cannot meet it"
            )
    return float(np.percentile(times, 95))


def _short(values: Any, limit: int = 12) -> str:
    items = list(values)
    text = ", ".join(map(str, items[:limit]))
    return f"[{text}{', ...' if len(items) > limit else ''}]"


# ---- probation ---------------------------------------------------------------------------------
class Baseline(msgspec.Struct, frozen=True, kw_only=True):
    """What the old model did in this process before the switch (persisted with the pending switch)."""

    inferences: int = 0
    confidence_mean: float | None = None
    error_rate: float | None = None

    @classmethod
    def of(cls, stats: ModelStats) -> Baseline:
        return cls(inferences=stats.inferences, confidence_mean=stats.confidence_mean, error_rate=stats.error_rate)


@dataclass(frozen=True)
class ProbationPolicy:
    duration_s: float
    min_inferences: int  # fewer inputs than this (old or new) and the rates are not compared
    max_confidence_drop: float  # new mean confidence may be at most this much below the old
    max_error_rate_increase: float  # new error/rejection rate may be at most this much above the old


def probation_verdict(stats: ModelStats, baseline: Baseline, policy: ProbationPolicy) -> str | None:
    """Why the new model must go back, or None while it looks as good as the old one."""
    if stats.errors:
        return f"the model raised in run on {stats.errors} input(s): {stats.last_error}"
    handed = stats.inferences + stats.errors + stats.rejected
    if handed < policy.min_inferences:
        return None
    rate = stats.error_rate or 0.0
    base_rate = baseline.error_rate if baseline.inferences >= policy.min_inferences else None
    if rate > (base_rate or 0.0) + policy.max_error_rate_increase:
        before = f"{base_rate:.3f} before the switch" if base_rate is not None else "no baseline"
        return (
            f"error/rejection rate {rate:.3f} over {handed} inputs vs {before} "
            f"(allowed increase {policy.max_error_rate_increase})"
        )
    mean = stats.confidence_mean
    if (
        mean is not None
        and baseline.confidence_mean is not None
        and baseline.inferences >= policy.min_inferences
        and stats.inferences >= policy.min_inferences
        and mean < baseline.confidence_mean - policy.max_confidence_drop
    ):
        return (
            f"mean confidence {mean:.3f} over {stats.inferences} inferences vs {baseline.confidence_mean:.3f} "
            f"before the switch (allowed drop {policy.max_confidence_drop})"
        )
    return None
