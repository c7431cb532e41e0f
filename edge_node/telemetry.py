"""Per-window aggregation of everything the node did, turned into one `Telemetry` message.

Inference adds whole batches (numpy arrays), so the per-inference cost is a few array appends;
percentiles and feature statistics are computed once per window.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import psutil

from edge_node.uplink.budget import LinkCounts
from schemas import (
    ConfidenceStats,
    EntropyStats,
    EscalationCounts,
    FeatureStats,
    LatencyStats,
    LinkBytes,
    ModelRef,
    OutboxStats,
    Providers,
    Resources,
    SampleCounts,
    Telemetry,
    new_msg_id,
)


def pool_features(batch: npt.NDArray[Any], max_features: int) -> npt.NDArray[np.float64]:
    """Flatten each input and average contiguous chunks down to at most `max_features` values."""
    flat = batch.reshape(batch.shape[0], -1).astype(np.float64, copy=False)
    dims = flat.shape[1]
    if dims <= max_features:
        return flat
    edges = np.linspace(0, dims, max_features + 1).astype(np.intp)
    sums = np.add.reduceat(flat, edges[:-1], axis=1)
    pooled: npt.NDArray[np.float64] = sums / np.diff(edges)
    return pooled


@dataclass
class EscalationTally:
    sent: int = 0
    answered: int = 0
    timed_out: int = 0
    offline_fallback: int = 0
    shed: int = 0
    errors: int = 0
    agreed: int = 0
    over_budget: int = 0
    paused: int = 0

    def freeze(self) -> EscalationCounts:
        return EscalationCounts(**self.__dict__)


# Rows of pooled inputs gathered before they are added to the window's feature sums.
FOLD_ROWS = 1024


@dataclass
class Window:
    """What happened since the last telemetry message."""

    max_features: int
    started: float
    latencies_ms: list[npt.NDArray[np.float64]] = field(default_factory=list)
    edge_latencies_ms: list[npt.NDArray[np.float64]] = field(default_factory=list)  # path "edge" only
    confidences: list[npt.NDArray[np.float32]] = field(default_factory=list)
    entropies: list[npt.NDArray[np.float32]] = field(default_factory=list)
    classes: Counter[str] = field(default_factory=Counter)
    paths: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    escalations: EscalationTally = field(default_factory=EscalationTally)
    feature_n: int = 0
    feature_dims: int = 0
    feature_sum: npt.NDArray[np.float64] | None = None
    feature_sumsq: npt.NDArray[np.float64] | None = None
    # Pooled batches not yet summed: folded FOLD_ROWS at a time, since the four numpy calls of a
    # fold cost ~8 µs whatever the rows (a tenth of the loop's numpy work on a demo-model batch).
    _unfolded: list[npt.NDArray[Any]] = field(default_factory=list)
    _unfolded_rows: int = 0

    @property
    def count(self) -> int:
        return sum(self.paths.values())

    def add_batch(
        self,
        batch: npt.NDArray[Any],
        confidence: npt.NDArray[np.float32],
        entropy: npt.NDArray[np.float32],
    ) -> None:
        """Inputs that went through the model (their final answers are counted by `add_final`)."""
        self.confidences.append(confidence)
        self.entropies.append(entropy)
        flat = batch.reshape(batch.shape[0], -1)
        # Pooled only when wider than max_features; else summed as they are (in float64, at the fold).
        pooled = flat if flat.shape[1] <= self.max_features else pool_features(batch, self.max_features)
        dims = math.prod(batch.shape[1:])
        if dims != self.feature_dims and self.feature_n:
            # A model switched in mid-window takes inputs of another shape: its statistics start
            # afresh (summing them with the old model's would be meaningless, and cannot broadcast).
            self._unfolded, self._unfolded_rows = [], 0
            self.feature_sum = self.feature_sumsq = None
            self.feature_n = 0
        self._unfolded.append(pooled)
        self._unfolded_rows += len(pooled)
        if self._unfolded_rows >= FOLD_ROWS:
            self._fold()
        self.feature_n += batch.shape[0]
        self.feature_dims = dims

    def _fold(self) -> None:
        """Add the pooled batches waiting in `_unfolded` to the feature sums."""
        if not self._unfolded:
            return
        pooled = np.concatenate(self._unfolded) if len(self._unfolded) > 1 else self._unfolded[0]
        self._unfolded, self._unfolded_rows = [], 0
        total = pooled.sum(axis=0, dtype=np.float64)
        squares = np.square(pooled, dtype=np.float64).sum(axis=0)
        if self.feature_sum is None or self.feature_sumsq is None:
            self.feature_sum, self.feature_sumsq = total, squares
        else:
            self.feature_sum += total
            self.feature_sumsq += squares

    def add_final(self, labels: list[str], path: str, latencies_ms: npt.NDArray[np.float64]) -> None:
        """Final answers: their class, which path gave them, and end-to-end latency at the edge."""
        self.classes.update(labels)
        self.paths[path] += len(labels)
        self.latencies_ms.append(latencies_ms)
        if path == "edge":
            self.edge_latencies_ms.append(latencies_ms)

    def features(self) -> FeatureStats | None:
        self._fold()
        if self.feature_n == 0 or self.feature_sum is None or self.feature_sumsq is None:
            return None
        mean = self.feature_sum / self.feature_n
        var = np.maximum(self.feature_sumsq / self.feature_n - np.square(mean), 0.0)
        return FeatureStats(n=self.feature_n, dims=self.feature_dims, mean=_floats(mean), std=_floats(np.sqrt(var)))


def _floats(values: npt.NDArray[Any]) -> list[float]:
    """Feature statistics at float32 precision (7 digits, more than drift scoring can use): the
    compact encoding packs a list of float32 values in 4 bytes each, not 9."""
    as_float32: list[float] = values.astype(np.float32).tolist()
    return as_float32


def _latency(parts: list[npt.NDArray[np.float64]]) -> LatencyStats | None:
    if not parts:
        return None
    lat = np.concatenate(parts)
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    return LatencyStats(
        p50=round(float(p50), 4),
        p95=round(float(p95), 4),
        p99=round(float(p99), 4),
        max=round(float(lat.max()), 4),
        mean=round(float(lat.mean()), 4),
    )


def _confidence(window: Window) -> tuple[ConfidenceStats | None, EntropyStats | None]:
    if not window.confidences:
        return None, None
    conf = np.concatenate(window.confidences).astype(np.float64)
    ent = np.concatenate(window.entropies).astype(np.float64)
    c = ConfidenceStats(mean=_prob(conf.mean()), p05=_prob(np.percentile(conf, 5)), min=_prob(conf.min()))
    e = EntropyStats(
        mean=round(float(ent.mean()), 6), p95=round(float(np.percentile(ent, 95)), 6), max=round(float(ent.max()), 6)
    )
    return c, e


def _prob(value: Any) -> float:
    return round(min(max(float(value), 0.0), 1.0), 6)


class ResourceProbe:
    """CPU (since the previous call) and RSS of this process."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first call only sets the baseline

    def read(self) -> Resources:
        return Resources(
            cpu_percent=round(float(self._process.cpu_percent(None)), 2),
            rss_mb=round(self._process.memory_info().rss / 2**20, 2),
        )


@dataclass(frozen=True)
class TelemetryContext:
    """Identity fields every telemetry message carries."""

    fleet_id: str
    device_id: str
    providers: Providers


def build_telemetry(
    ctx: TelemetryContext,
    model: ModelRef,
    window: Window,
    *,
    seq: int,
    now: float,
    samples: tuple[int, int],
    outbox: OutboxStats,
    resources: Resources | None,
    link: LinkCounts | None = None,
) -> Telemetry:
    """Freeze a window into a telemetry message (empty windows carry counts but no statistics)."""
    confidence, entropy = _confidence(window)
    return Telemetry(
        msg_id=new_msg_id(),
        fleet_id=ctx.fleet_id,
        device_id=ctx.device_id,
        ts=now,
        model=model,
        window_start=window.started,
        window_end=now,
        window_seq=seq,
        count=window.count,
        rejected=sum(window.rejected.values()),
        rejected_reasons=dict(window.rejected),
        latency_ms=_latency(window.latencies_ms),
        edge_latency_ms=_latency(window.edge_latencies_ms),
        confidence=confidence,
        entropy=entropy,
        class_counts=dict(window.classes),
        paths=dict(window.paths),
        escalations=window.escalations.freeze(),
        samples=SampleCounts(sent=samples[0], skipped_budget=samples[1]),
        outbox=outbox,
        resources=resources,
        providers=ctx.providers,
        features=window.features(),
        link=LinkBytes(up=link.up, down=link.down, held=link.held, budget_left=link.left) if link is not None else None,
    )
