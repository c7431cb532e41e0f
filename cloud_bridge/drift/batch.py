"""Drift scores of many (device, model version) pools at once: one numpy pass per statistic.

`score_batch` computes what `pool` + `score_all` (cloud_bridge/drift/scoring.py) compute for each
job — the same formulas, thresholds and "not enough samples" rules — but over arrays holding every
job of an ingest batch: class counts as a jobs × labels matrix (PSI), confidences and latencies as
jobs × windows, pooled features as jobs × windows × features per feature width. Per telemetry window
the Python work left is filling those arrays; the arithmetic is shared.

Scores come without their human-readable `detail` (formatting it for every window would cost more
than the maths): `detail_for` fills it in for the few scores that change an alert's state, from the
same windows through the per-window functions.

Floating-point sums may be ordered differently from the per-window path, so a score can differ from
it in the last bits (tests compare with a relative tolerance of 1e-9; alerts are the same).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from cloud_bridge.drift.scoring import (
    Baseline,
    DriftSettings,
    Score,
    _confidence,
    _features,
    _latency,
    _prediction,
)
from cloud_bridge.drift.windows import Pool, WindowStats, pool


@dataclass(frozen=True)
class Job:
    """One evaluation: a baseline and the recent windows (oldest first) to pool and score against it."""

    baseline: Baseline
    windows: Sequence[WindowStats]


@dataclass(frozen=True)
class Scored:
    window_start: float
    window_end: float
    scores: list[Score]


def detail_for(settings: DriftSettings, job: Job, score: Score) -> Score:
    """The score with its detail text, from the per-window path (for alerts: rare)."""
    recent = pool(job.windows)
    stats = job.baseline.stats
    full: Score | None
    if score.kind == "prediction_drift":
        full = _prediction(settings, job.baseline, recent)
    elif stats is None:
        full = None
    elif score.kind == "confidence_drift":
        full = _confidence(settings, stats, recent)
    elif score.kind == "feature_drift":
        full = _features(settings, stats, recent)
    else:
        full = _latency(settings, stats, recent)
    return replace(score, detail=full.detail) if full is not None else score


class _Window:
    """A window's numbers in the form the arrays take them, made once per window (a window is in
    `recent_windows` consecutive pools, so this is what makes the per-window Python work small)."""

    __slots__ = ("dims", "label_counts", "labels", "moments", "scalars", "window")

    def __init__(self, w: WindowStats, labels: tuple[str, ...]) -> None:
        self.window = w
        nan = float("nan")
        self.scalars = (
            float(w.count),
            nan if w.confidence is None else float(w.confidence),
            nan if w.latency_p95 is None else float(w.latency_p95),
        )
        self.labels = labels
        self.label_counts = np.fromiter(w.classes.values(), dtype=np.float64, count=len(labels))
        usable = w.feature_n > 0 and w.feature_mean is not None and w.feature_std is not None
        self.dims = 0
        self.moments: np.ndarray | None = None  # means then standard deviations, one row
        if usable and w.feature_mean is not None and w.feature_std is not None:
            self.dims = len(w.feature_mean)
            self.moments = np.concatenate([w.feature_mean, w.feature_std]).astype(np.float64, copy=False)


class WindowCache:
    """`_Window` forms by window identity (bounded, least recently made out), and one shared tuple
    per distinct label set, so a batch maps each label set to array columns once."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._items: dict[int, _Window] = {}
        self._label_sets: dict[tuple[str, ...], tuple[str, ...]] = {}

    def get(self, w: WindowStats) -> _Window:
        item = self._items.get(id(w))
        if item is None or item.window is not w:
            labels = tuple(w.classes)
            labels = self._label_sets.setdefault(labels, labels)
            if len(self._label_sets) > 10_000:
                self._label_sets.clear()
            item = self._items[id(w)] = _Window(w, labels)
            if len(self._items) > self.capacity:
                for old in list(self._items)[: self.capacity // 4]:
                    del self._items[old]
        return item


def score_batch(settings: DriftSettings, jobs: Sequence[Job], cache: WindowCache | None = None) -> list[Scored]:
    """Every job's scores, in the order `score_all` gives them."""
    s = settings
    m = len(jobs)
    if m == 0:
        return []
    cache = cache if cache is not None else WindowCache()
    forms = [[cache.get(w) for w in job.windows] for job in jobs]
    width = max(len(f) for f in forms)
    rows = np.repeat(np.arange(m), [len(f) for f in forms])
    cols = np.concatenate([np.arange(len(f)) for f in forms])
    flat = [x for f in forms for x in f]
    scalars = np.array([x.scalars for x in flat]).reshape(-1, 3)
    counts = np.zeros((m, width))
    conf = np.full((m, width), np.nan)
    lat = np.full((m, width), np.nan)
    counts[rows, cols] = scalars[:, 0]
    conf[rows, cols] = scalars[:, 1]
    lat[rows, cols] = scalars[:, 2]
    samples = counts.sum(axis=1)
    psi = _psi(s, jobs, flat, rows)
    conf_value = _pooled_confidence(counts, conf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no latency reported
        lat_value = np.nanmedian(lat, axis=1)
    features = _feature_fractions(s, jobs, forms)
    out: list[Scored] = []
    for i, job in enumerate(jobs):
        ws = job.windows
        start = min(w.window_start for w in ws)
        end = max(w.window_end for w in ws)
        scores: list[Score] = []
        if samples[i] >= s.min_samples:
            scores.append(Score("prediction_drift", float(psi[i]), s.psi_high, s.psi_low, ""))
            stats = job.baseline.stats
            if stats is not None:
                if stats.confidence is not None and not np.isnan(conf_value[i]):
                    drop = stats.confidence - float(conf_value[i])
                    scores.append(Score("confidence_drift", drop, s.confidence_drop_high, s.confidence_drop_low, ""))
                if i in features:
                    fraction = features[i]
                    scores.append(Score("feature_drift", fraction, s.feature_fraction_high, s.feature_fraction_low, ""))
                if stats.latency_p95 is not None and not np.isnan(lat_value[i]):
                    scores.append(_latency_score(s, stats, float(lat_value[i])))
        out.append(Scored(start, end, scores))
    return out


def _psi(s: DriftSettings, jobs: Sequence[Job], flat: list[_Window], rows: np.ndarray) -> np.ndarray:
    """PSI of every job's pooled class counts against its baseline mix (`psi` in scoring.py)."""
    vocabulary: dict[str, int] = {}
    columns: dict[int, np.ndarray] = {}  # by label-set identity

    def columns_of(labels: tuple[str, ...]) -> np.ndarray:
        found = columns.get(id(labels))
        if found is None:
            found = columns[id(labels)] = np.array(
                [vocabulary.setdefault(lb, len(vocabulary)) for lb in labels], dtype=np.intp
            )
        return found

    cell_cols = [columns_of(x.labels) for x in flat]
    mix_labels = [tuple(job.baseline.class_mix) for job in jobs]
    mix_cols = [np.array([vocabulary.setdefault(lb, len(vocabulary)) for lb in ls], dtype=np.intp) for ls in mix_labels]
    m, k = len(jobs), max(len(vocabulary), 1)
    observed = np.zeros((m, k))
    seen = np.zeros((m, k), dtype=bool)
    sizes = [len(c) for c in cell_cols]
    if sum(sizes):
        r = np.repeat(rows, sizes)
        c = np.concatenate(cell_cols)
        np.add.at(observed, (r, c), np.concatenate([x.label_counts for x in flat]))
        seen[r, c] = True
    mix = np.zeros((m, k))
    mix_sizes = [len(c) for c in mix_cols]
    if sum(mix_sizes):
        r = np.repeat(np.arange(m), mix_sizes)
        c = np.concatenate(mix_cols)
        mix[r, c] = np.fromiter((v for job in jobs for v in job.baseline.class_mix.values()), np.float64, len(c))
        seen[r, c] = True
    mix_samples = np.array([job.baseline.class_samples for job in jobs], dtype=np.float64)
    classes = seen.sum(axis=1)
    n = observed.sum(axis=1)
    base = np.where(mix_samples > 0, mix_samples, np.maximum(n, 1))
    pc = s.psi_pseudocount
    with np.errstate(invalid="ignore", divide="ignore"):  # a job with no labels at all: PSI 0, as psi()
        p = (observed + pc) / (n + pc * classes)[:, None]
        q = (mix * base[:, None] + pc) / (base + pc * classes)[:, None]
        terms = np.where(seen, (p - q) * np.log(p / q), 0.0)
    return np.asarray(terms.sum(axis=1))


def _pooled_confidence(counts: np.ndarray, conf: np.ndarray) -> np.ndarray:
    usable = ~np.isnan(conf) & (counts > 0)
    weight = np.where(usable, counts, 0.0)
    total = weight.sum(axis=1)
    weighted = np.where(usable, conf, 0.0) * weight
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, weighted.sum(axis=1) / np.where(total > 0, total, 1.0), np.nan)


def _feature_fractions(s: DriftSettings, jobs: Sequence[Job], forms: list[list[_Window]]) -> dict[int, float]:
    """The feature-drift score (fraction of features beyond |z|) of every job that has one, pooled and
    compared per feature width (windows of another width than the job's newest do not pool)."""
    groups: dict[int, list[tuple[int, list[_Window]]]] = {}
    for i, job in enumerate(jobs):
        stats = job.baseline.stats
        if stats is None or stats.feature_mean is None or stats.feature_std is None:
            continue
        dims = next((x.dims for x in reversed(forms[i]) if x.dims), 0)
        if dims == 0 or dims != len(stats.feature_mean):
            continue
        groups.setdefault(dims, []).append((i, [x for x in forms[i] if x.dims == dims]))
    out: dict[int, float] = {}
    for dims, members in groups.items():
        out.update(_fractions_of_width(s, jobs, dims, members))
    return out


def _fractions_of_width(
    s: DriftSettings, jobs: Sequence[Job], dims: int, members: list[tuple[int, list[_Window]]]
) -> dict[int, float]:
    g = len(members)
    flat = [x for _, ws in members for x in ws]
    # Windows are grouped by job in order: sums per job are np.add.reduceat over the flat rows
    # (no padded jobs x windows x features arrays to allocate and fill).
    offsets = np.cumsum([0] + [len(ws) for _, ws in members[:-1]])
    ns = np.array([x.window.feature_n for x in flat], dtype=np.float64)
    moments = np.concatenate([x.moments for x in flat if x.moments is not None]).reshape(-1, 2 * dims)
    means, stds = moments[:, :dims], moments[:, dims:]
    weighted = np.empty_like(moments)
    np.multiply(means, ns[:, None], out=weighted[:, :dims])
    np.multiply(stds * stds + means * means, ns[:, None], out=weighted[:, dims:])
    sums = np.add.reduceat(weighted, offsets, axis=0)
    total = np.add.reduceat(ns, offsets)
    bases: list[Pool] = [b for i, _ in members if (b := jobs[i].baseline.stats) is not None]
    base_mean = np.concatenate([_vector(b.feature_mean) for b in bases]).reshape(g, dims)
    base_std = np.concatenate([_vector(b.feature_std) for b in bases]).reshape(g, dims)
    base_n = np.array([b.feature_n for b in bases], dtype=np.float64)
    mean = sums[:, :dims] / total[:, None]
    second = sums[:, dims:] / total[:, None]
    std = np.sqrt(np.maximum(second - mean * mean, 0.0))
    n_recent = np.floor(total)  # the pooled count is an integer (Pool.feature_n)
    se = np.sqrt(np.square(base_std) / base_n[:, None] + np.square(std) / n_recent[:, None])
    diff = np.abs(mean - base_mean)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(diff > 1e-9, np.inf, 0.0))
    beyond = np.count_nonzero(z > s.feature_z, axis=1)
    return {i: float(beyond[r]) / dims for r, (i, _) in enumerate(members)}


def _vector(values: np.ndarray | None) -> np.ndarray:
    assert values is not None  # checked by _feature_fractions
    return values


def _latency_score(s: DriftSettings, base: Pool, recent_p95: float) -> Score:
    assert base.latency_p95 is not None
    high = min(max(s.latency_ratio_high * base.latency_p95, s.latency_floor_ms), s.latency_budget_ms)
    low = min(max(s.latency_ratio_low * base.latency_p95, s.latency_floor_ms), s.latency_budget_ms)
    return Score("latency", recent_p95, high, min(low, high), "")
