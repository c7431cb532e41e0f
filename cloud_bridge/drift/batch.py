"""Drift scores of many (device, model version) pools at once: one numpy pass per statistic.

`score_arrays` computes what `pool` + `score_all` (cloud_bridge/drift/scoring.py) compute for each
job — the same formulas, thresholds and "not enough samples" rules — but over arrays holding every
job of an ingest batch. Each window and baseline is a row of shared arrays made once
(cloud_bridge/drift/slabs.py); a batch gathers the rows of its jobs' windows by index and pools them
with `reduceat` over the jobs' runs of rows (windows are grouped by job, oldest first). Per window
the Python work left is one dictionary lookup.

The result is arrays too (`Scores`: jobs x kinds, in `KINDS` order), which the bridge steps through
the alert hysteresis without making a `Score` per kind (cloud_bridge/drift/store.py); `score_batch`
gives them in `score_all`'s form. Scores come without their human-readable `detail` (formatting it
for every window would cost more than the maths): `detail_for` fills it in for the few scores that
change an alert's state, from the same windows through the per-window functions.

Floating-point sums may be ordered differently from the per-window path, so a score can differ from
it in the last bits (tests compare with a relative tolerance of 1e-9; alerts are the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from cloud_bridge.drift.scoring import (
    KINDS,
    Baseline,
    DriftSettings,
    Score,
    _confidence,
    _features,
    _latency,
    _prediction,
)
from cloud_bridge.drift.slabs import (
    B_CONF,
    B_DIMS,
    B_FN,
    B_FROW,
    B_LAT,
    B_NMIX,
    B_SAMPLES,
    W_CONF,
    W_COUNT,
    W_DIMS,
    W_END,
    W_FN,
    W_FROW,
    W_LAT,
    W_NLAB,
    W_START,
    WindowCache,
)
from cloud_bridge.drift.windows import WindowStats, pool

__all__ = ["Job", "Scored", "Scores", "WindowCache", "detail_for", "score_arrays", "score_batch"]

PREDICTION, CONFIDENCE, FEATURE, LATENCY = range(4)  # columns of `Scores` arrays, as KINDS


@dataclass(slots=True)  # one per evaluation: not frozen, which costs ~1 us more to make
class Job:
    """One evaluation: a baseline and the recent windows (oldest first) to pool and score against it."""

    baseline: Baseline
    windows: Sequence[WindowStats]


@dataclass(frozen=True)
class Scored:
    window_start: float
    window_end: float
    scores: list[Score]


@dataclass(frozen=True)
class Scores:
    """Every job's scores as jobs x kinds arrays (columns in `KINDS` order); `present` says which
    were computed (the others are as `score_all` leaves them out: too few samples, no baseline)."""

    values: np.ndarray
    present: np.ndarray
    high: np.ndarray
    low: np.ndarray
    window_start: np.ndarray  # the span of each job's windows
    window_end: np.ndarray

    def scored(self, i: int) -> Scored:
        """Job `i`'s scores in `score_all`'s form."""
        scores = [
            Score(kind, float(self.values[i, k]), float(self.high[i, k]), float(self.low[i, k]), "")
            for k, kind in enumerate(KINDS)
            if self.present[i, k]
        ]
        return Scored(float(self.window_start[i]), float(self.window_end[i]), scores)


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


def score_batch(settings: DriftSettings, jobs: Sequence[Job], cache: WindowCache | None = None) -> list[Scored]:
    """Every job's scores, in the order `score_all` gives them."""
    scores = score_arrays(settings, jobs, cache)
    return [scores.scored(i) for i in range(len(jobs))]


@dataclass(frozen=True)
class _Gathered:
    """A batch's window rows (grouped by job, oldest first) and baseline rows, with their labels."""

    m: int
    lens: np.ndarray  # windows per job
    offsets: np.ndarray  # first window row of each job
    job_of: np.ndarray  # the job of each window row
    w: np.ndarray  # window rows
    b: np.ndarray  # baseline rows, one per job
    labels: np.ndarray  # 2 x n: (column, count) of every window's labels, in window order
    mix: np.ndarray  # 2 x n: (column, share) of every baseline's class mix, in job order


def _gather(cache: WindowCache, jobs: Sequence[Job]) -> _Gathered:
    rows, base_rows, mixes = cache.rows(jobs)
    m = len(jobs)
    n = np.fromiter((len(job.windows) for job in jobs), dtype=np.intp, count=m)
    if not n.all():
        raise ValueError("a drift job needs at least one window")
    ends = np.cumsum(n)
    w = cache.window_rows.data.take(rows, axis=0)
    return _Gathered(
        m=m,
        lens=n,
        offsets=ends - n,
        job_of=np.repeat(np.arange(m), n),
        w=w,
        b=cache.base_rows.data.take(base_rows, axis=0),
        labels=cache.label_pairs(w),
        mix=np.concatenate(mixes, axis=1),
    )


def score_arrays(settings: DriftSettings, jobs: Sequence[Job], cache: WindowCache | None = None) -> Scores:
    """Every job's scores (see `Scores`)."""
    s = settings
    cache = cache if cache is not None else WindowCache()
    m = len(jobs)
    if m == 0:
        empty = np.zeros((0, len(KINDS)))
        return Scores(empty, empty.astype(bool), empty, empty, np.zeros(0), np.zeros(0))
    try:
        return _score(s, cache, _gather(cache, jobs))
    finally:
        cache.trim()  # after the arithmetic: the rows it reads stay as they are until then


def _score(s: DriftSettings, cache: WindowCache, g: _Gathered) -> Scores:
    m = g.m
    w, b, offsets = g.w, g.b, g.offsets
    samples = np.add.reduceat(w[:, W_COUNT], offsets)
    enough = samples >= s.min_samples
    values = np.full((m, len(KINDS)), np.nan)
    present = np.zeros((m, len(KINDS)), dtype=bool)
    high = np.empty((m, len(KINDS)))
    low = np.empty((m, len(KINDS)))
    high[:, PREDICTION], low[:, PREDICTION] = s.psi_high, s.psi_low
    high[:, CONFIDENCE], low[:, CONFIDENCE] = s.confidence_drop_high, s.confidence_drop_low
    high[:, FEATURE], low[:, FEATURE] = s.feature_fraction_high, s.feature_fraction_low

    values[:, PREDICTION] = _psi(s, cache, g)
    present[:, PREDICTION] = enough

    with np.errstate(invalid="ignore", divide="ignore"):
        recent_conf = _pooled_confidence(w[:, W_COUNT], w[:, W_CONF], offsets)
        values[:, CONFIDENCE] = b[:, B_CONF] - recent_conf
    present[:, CONFIDENCE] = enough & ~np.isnan(b[:, B_CONF]) & ~np.isnan(recent_conf)

    fractions, scored = _feature_fractions(s, cache, g, enough)
    values[:, FEATURE] = fractions
    present[:, FEATURE] = scored

    base_p95 = b[:, B_LAT]
    recent_p95 = _median_p95(w[:, W_LAT], g)
    values[:, LATENCY] = recent_p95
    present[:, LATENCY] = enough & ~np.isnan(base_p95) & ~np.isnan(recent_p95)
    lat_high = np.minimum(np.maximum(s.latency_ratio_high * base_p95, s.latency_floor_ms), s.latency_budget_ms)
    lat_low = np.minimum(np.maximum(s.latency_ratio_low * base_p95, s.latency_floor_ms), s.latency_budget_ms)
    high[:, LATENCY], low[:, LATENCY] = lat_high, np.minimum(lat_low, lat_high)

    start = np.minimum.reduceat(w[:, W_START], offsets)
    end = np.maximum.reduceat(w[:, W_END], offsets)
    return Scores(values, present, high, low, start, end)


def _psi(s: DriftSettings, cache: WindowCache, g: _Gathered) -> np.ndarray:
    """PSI of every job's pooled class counts against its baseline mix (`psi` in scoring.py)."""
    m = g.m
    label_job = np.repeat(g.job_of, g.w[:, W_NLAB].astype(np.intp))
    mix_job = np.repeat(np.arange(m), g.b[:, B_NMIX].astype(np.intp))
    label_col = g.labels[0].astype(np.intp)
    mix_col = g.mix[0].astype(np.intp)
    k = max(len(cache.labels), 1)
    if m * k > 4 * (len(label_col) + len(mix_col)) + 4096:
        # A large vocabulary (many models, many labels): only the labels this batch uses get a column.
        used, inverse = np.unique(np.concatenate([label_col, mix_col]), return_inverse=True)
        k = max(len(used), 1)
        label_col, mix_col = inverse[: len(label_col)], inverse[len(label_col) :]
    label_cell = label_job * k + label_col
    mix_cell = mix_job * k + mix_col
    observed = np.bincount(label_cell, weights=g.labels[1], minlength=m * k).reshape(m, k)
    seen = (np.bincount(label_cell, minlength=m * k) + np.bincount(mix_cell, minlength=m * k)).reshape(m, k) > 0
    mix_cells = np.zeros(m * k)
    mix_cells[mix_cell] = g.mix[1]
    mix = mix_cells.reshape(m, k)
    mix_samples = g.b[:, B_SAMPLES]
    classes = seen.sum(axis=1)
    n = observed.sum(axis=1)
    base = np.where(mix_samples > 0, mix_samples, np.maximum(n, 1))
    pc = s.psi_pseudocount
    with np.errstate(invalid="ignore", divide="ignore"):  # a job with no labels at all: PSI 0, as psi()
        p = (observed + pc) / (n + pc * classes)[:, None]
        q = (mix * base[:, None] + pc) / (base + pc * classes)[:, None]
        terms = np.where(seen, (p - q) * np.log(p / q), 0.0)
        # Less what sampling alone gives (scoring.psi_noise): (k - 1)(1/n + 1/m), m infinite for an
        # exact reference mix.
        per_sample = 1.0 / np.maximum(n, 1) + np.where(mix_samples > 0, 1.0 / np.maximum(mix_samples, 1), 0.0)
        noise = np.where(n > 0, np.maximum(classes - 1, 0) * per_sample, 0.0)
    return np.asarray(np.maximum(terms.sum(axis=1) - noise, 0.0))


def _pooled_confidence(counts: np.ndarray, conf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Count-weighted mean confidence of each job's windows that report one (NaN: none does)."""
    usable = ~np.isnan(conf) & (counts > 0)
    weight = np.where(usable, counts, 0.0)
    total = np.add.reduceat(weight, offsets)
    weighted = np.add.reduceat(np.where(usable, conf, 0.0) * weight, offsets)
    return np.where(total > 0, weighted / np.where(total > 0, total, 1.0), np.nan)


def _median_p95(p95: np.ndarray, g: _Gathered) -> np.ndarray:
    """Median of each job's reported window p95s (NaN: none reported), as statistics.median: the
    middle value, or the mean of the two middle ones."""
    width = int(g.lens.max())
    padded = np.full((g.m, width), np.nan)
    padded[g.job_of, np.arange(len(p95)) - np.repeat(g.offsets, g.lens)] = p95
    ordered = np.sort(padded, axis=1)  # NaN sorts last
    k = np.count_nonzero(~np.isnan(padded), axis=1)
    rows = np.arange(g.m)
    lo = ordered[rows, np.maximum(k - 1, 0) // 2]
    hi = ordered[rows, k // 2]
    return np.where(k > 0, (lo + hi) / 2, np.nan)


def _feature_fractions(
    s: DriftSettings, cache: WindowCache, g: _Gathered, enough: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The feature-drift score (fraction of features beyond |z|) of every job, and which jobs have
    one: features pool over the windows of the job's newest feature width, compared with a
    baseline of that width."""
    w, b = g.w, g.b
    n = len(w)
    window_dims = w[:, W_DIMS]
    # The newest window (last in the job's order) that carries features decides the job's width.
    newest = np.maximum.reduceat(np.where(window_dims > 0, np.arange(n), -1), g.offsets)
    job_dims = np.where(newest >= 0, window_dims[newest], 0.0)
    scored = enough & (job_dims > 0) & (job_dims == b[:, B_DIMS])
    fractions = np.full(g.m, np.nan)
    pooled = scored[g.job_of] & (window_dims == job_dims[g.job_of])
    # Jobs x windows of slab rows (row 0 of a feature slab is all zeros: padding adds nothing); a
    # sum over the windows' axis is ~2x cheaper than np.add.reduceat over rows of a 2-D array.
    position = np.arange(n) - np.repeat(g.offsets, g.lens)
    width = int(g.lens.max())
    for dims in np.unique(job_dims[scored]):
        d = int(dims)
        members = np.flatnonzero(scored & (job_dims == dims))
        rows = np.flatnonzero(pooled & (window_dims == dims))
        slab_rows = np.zeros((g.m, width), dtype=np.intp)
        slab_rows[g.job_of[rows], position[rows]] = w[rows, W_FROW]
        counts = np.zeros((g.m, width))
        counts[g.job_of[rows], position[rows]] = w[rows, W_FN]
        sums = cache.window_features[d].data[slab_rows[members]].sum(axis=1)
        total = counts[members].sum(axis=1)
        base = cache.base_features[d].data[b[members, B_FROW].astype(np.intp)]
        base_mean, base_std = base[:, :d], base[:, d:]
        base_n = b[members, B_FN]
        mean = sums[:, :d] / total[:, None]
        second = sums[:, d:] / total[:, None]
        std = np.sqrt(np.maximum(second - mean * mean, 0.0))
        n_recent = np.floor(total)  # the pooled count is an integer (Pool.feature_n)
        se = np.sqrt(np.square(base_std) / base_n[:, None] + np.square(std) / n_recent[:, None])
        diff = np.abs(mean - base_mean)
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(diff > 1e-9, np.inf, 0.0))
        fractions[members] = np.count_nonzero(z > s.feature_z, axis=1) / d
    return fractions, scored
