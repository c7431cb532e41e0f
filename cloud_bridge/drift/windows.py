"""One telemetry window as drift needs it, and several pooled: the inputs of every drift score.

`WindowStats.from_body` reads the telemetry body the registry stores (builtins, no second decode on
the hot path); `pool` combines the windows of a baseline or of the recent pool
(cloud_bridge/drift/scoring.py scores one pool against the other).
"""

from __future__ import annotations

import array
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]


def _floats(values: Sequence[float]) -> Floats:
    if isinstance(values, list):
        # A copy: the array.array (a container the collector tracks) must not live on with the window.
        return np.frombuffer(array.array("d", values), dtype=np.float64).copy()
    return np.asarray(values, dtype=np.float64)


def own_latency(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The latency stats of a telemetry body (builtins) that measure the device itself: its answers
    final at the edge. With more than 5% escalated, the p95 of all answers is the cloud round trip's,
    neither the device's nor stable; devices on older software send only that one."""
    lat = body.get("edge_latency_ms") or body.get("latency_ms")
    return lat if isinstance(lat, Mapping) else None


@dataclass(frozen=True, slots=True)  # no __dict__: one object fewer per window for the GC to visit
class WindowStats:
    window_start: float
    window_end: float
    count: int
    classes: Mapping[str, int]
    confidence: float | None = None
    latency_p95: float | None = None
    feature_n: int = 0
    feature_mean: Floats | None = None
    feature_std: Floats | None = None

    @classmethod
    def from_body(cls, body: Mapping[str, Any], features: Mapping[str, Any] | None = None) -> WindowStats:
        """From a telemetry message as builtins (the TelemetryRow body): no second decode on the hot
        path. `features`: the window's feature statistics where the body no longer holds them
        (Batch.features)."""
        conf = body.get("confidence")
        lat = own_latency(body)
        feats = body.get("features") if features is None else features
        mean = std = None
        n = 0
        if feats and feats.get("n", 0) > 0 and len(feats["mean"]) == len(feats["std"]) and feats["mean"]:
            n = int(feats["n"])
            # array.array reads a list of floats in one pass; np.asarray first walks it to find its
            # shape and type (1.6 against 2.5 us for 64 floats on the bench VM, twice per window).
            mean = _floats(feats["mean"])
            std = _floats(feats["std"])
        return cls(
            window_start=float(body["window_start"]),
            window_end=float(body["window_end"]),
            count=int(body["count"]),
            classes=dict(body.get("class_counts") or {}),
            confidence=float(conf["mean"]) if conf else None,
            latency_p95=float(lat["p95"]) if lat else None,
            feature_n=n,
            feature_mean=mean,
            feature_std=std,
        )


@dataclass(frozen=True)
class Pool:
    """Several windows pooled: total class counts, weighted confidence, median p95, pooled features."""

    windows: int
    samples: int
    classes: dict[str, int]
    confidence: float | None
    latency_p95: float | None
    feature_n: int
    feature_mean: Floats | None
    feature_std: Floats | None
    window_start: float
    window_end: float


def pool(windows: Sequence[WindowStats]) -> Pool:
    """Pool windows: counts add, means weight by count, the p95 is the median of the windows' p95."""
    if not windows:
        raise ValueError("pool() needs at least one window")
    classes: dict[str, int] = {}
    for w in windows:
        for label, n in w.classes.items():
            classes[label] = classes.get(label, 0) + n
    conf = [(w.confidence, w.count) for w in windows if w.confidence is not None and w.count > 0]
    conf_n = sum(n for _, n in conf)
    lat = [w.latency_p95 for w in windows if w.latency_p95 is not None]
    n, mean, std = _pool_features(windows)
    return Pool(
        windows=len(windows),
        samples=sum(w.count for w in windows),
        classes=classes,
        confidence=sum(c * k for c, k in conf) / conf_n if conf_n else None,
        # statistics.median: the same value as np.median for a handful of floats, 30x cheaper.
        latency_p95=float(statistics.median(lat)) if lat else None,
        feature_n=n,
        feature_mean=mean,
        feature_std=std,
        window_start=min(w.window_start for w in windows),
        window_end=max(w.window_end for w in windows),
    )


def _pool_features(windows: Sequence[WindowStats]) -> tuple[int, Floats | None, Floats | None]:
    usable = [
        (w.feature_n, w.feature_mean, w.feature_std)
        for w in windows
        if w.feature_mean is not None and w.feature_std is not None and w.feature_n > 0
    ]
    if not usable:
        return 0, None, None
    # Only windows with the newest feature width pool (a node reconfigured mid-stream would differ).
    dims = len(usable[-1][1])
    same = [(n, m, sd) for n, m, sd in usable if len(m) == dims]
    ns = np.array([n for n, _, _ in same], dtype=np.float64)
    means = np.array([m for _, m, _ in same])
    stds = np.array([sd for _, _, sd in same])
    total = float(ns.sum())
    # Count-weighted sums as one vector-matrix product each (drift runs this for every window).
    mean = (ns @ means) / total
    second = (ns @ (stds * stds + means * means)) / total
    std = np.sqrt(np.maximum(second - mean * mean, 0.0))
    return int(total), mean, std
