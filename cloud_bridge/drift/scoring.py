"""Drift detection from telemetry windows: pure computation and the per-kind alert state machine.

Per (device, model version) the bridge compares a *recent* pool (the newest `recent_windows`
telemetry windows) with a *baseline*:

* prediction drift: PSI of the predicted class mix against the baseline mix, with additive
  smoothing (`psi_pseudocount` per class) so an empty class cannot make a term infinite, less what
  sampling alone gives: two samples of one mix, n and m inferences over k classes, differ by a PSI
  of about (k - 1)(1/n + 1/m) (PSI is close to a chi-square over the samples), which at a device's
  1 Hz and short baselines is the whole alarm (10 digits, 50 inferences each side: 0.36 against
  a 0.2 threshold; 37% of 10,000 simulated devices without drift fired). The score is the excess,
  never below 0. The baseline mix is the model's reference class mix (ONNX metadata
  `reference_class_mix`, exact: m infinite) when the bridge knows the model, else the class mix of
  the first `baseline_windows` windows.
* confidence drift: how far the count-weighted mean top-1 confidence fell below the baseline's, in
  absolute probability (a drop; a rise is not an alert).
* feature drift: a two-sample z-score per pooled input feature, (mean_recent - mean_base) /
  sqrt(std_base^2/n_base + std_recent^2/n_recent); the score is the fraction of features whose
  |z| exceeds `feature_z` (the n-correction makes a fixed z mean the same at any window size).
* latency: the median of the recent windows' p95 of the answers final at the edge (the device's
  own speed; all answers from devices that do not report it, see `own_latency`) against a limit
  that is `latency_ratio_high` times the baseline p95 (never below `latency_floor_ms`, so
  micro-second jitter does not page anyone) and never above the absolute `latency_budget_ms`:
  either breach is an anomaly. Score and threshold are both in milliseconds.

Windows and pools (cloud_bridge/drift/windows.py) are the inputs; their stored forms are in
cloud_bridge/drift/codec.py.

Nothing is scored before the recent pool holds `min_samples` inferences (and the baseline as many).

Each kind has a hysteresis state: it fires after `fire_after` consecutive evaluations above its high
threshold, resolves after `resolve_after` consecutive evaluations below its low threshold, and after
resolving it cannot fire again until `cooldown_s` of telemetry time has passed (per device, model
and kind). Time is the devices' window time, not the bridge's clock, so every bridge computing from
the same stored windows reaches the same decision. Where those windows and states are stored, and
why several bridges agree, is in cloud_bridge/drift/store.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from cloud_bridge.drift.windows import Pool, WindowStats, pool

Kind = Literal["prediction_drift", "confidence_drift", "feature_drift", "latency"]
KINDS: tuple[Kind, ...] = ("prediction_drift", "confidence_drift", "feature_drift", "latency")


@dataclass(frozen=True)
class DriftSettings:
    """Thresholds of the detector (the `[drift]` config section carries the same names)."""

    baseline_windows: int = 10
    recent_windows: int = 6
    min_samples: int = 200
    psi_pseudocount: float = 0.5
    psi_high: float = 0.2
    psi_low: float = 0.1
    confidence_drop_high: float = 0.05
    confidence_drop_low: float = 0.025
    feature_z: float = 5.0
    feature_fraction_high: float = 0.1
    feature_fraction_low: float = 0.05
    latency_ratio_high: float = 3.0
    latency_ratio_low: float = 2.0
    latency_floor_ms: float = 1.0
    latency_budget_ms: float = 100.0
    fire_after: int = 3
    resolve_after: int = 3
    cooldown_s: float = 300.0


# ---- baseline ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Baseline:
    """What "normal" is for one (device, model version)."""

    source: Literal["reference", "windows"]
    class_mix: dict[str, float]
    class_samples: int  # 0 for a reference mix (treated as exact)
    stats: Pool | None  # the first windows; None while they are still being collected

    @property
    def ready(self) -> bool:
        return self.stats is not None


def reference_baseline(mix: Mapping[str, float]) -> Baseline:
    """A baseline whose class mix is the model's reference; the other statistics come later."""
    total = sum(mix.values())
    if total <= 0 or any(v < 0 or not math.isfinite(v) for v in mix.values()):
        raise ValueError(f"reference class mix must be non-negative and sum > 0, got {dict(mix)}")
    return Baseline("reference", {k: v / total for k, v in mix.items()}, 0, None)


def complete_baseline(current: Baseline | None, first: Sequence[WindowStats]) -> Baseline:
    """Freeze the first windows into the baseline (keeping a reference class mix if there is one)."""
    stats = pool(first)
    if current is not None and current.source == "reference":
        return replace(current, stats=stats)
    total = max(stats.samples, 1)
    mix = {label: n / total for label, n in stats.classes.items()}
    return Baseline("windows", mix, stats.samples, stats)


def baseline_complete(settings: DriftSettings, collected: Sequence[WindowStats]) -> bool:
    """Whether the windows collected since a model version appeared are enough to freeze a baseline."""
    return len(collected) >= settings.baseline_windows and sum(w.count for w in collected) >= settings.min_samples


# ---- scores --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Score:
    kind: Kind
    score: float
    high: float
    low: float
    detail: str


def psi(counts: Mapping[str, int], mix: Mapping[str, float], mix_samples: int, pseudocount: float) -> float:
    """Population stability index of observed `counts` against a baseline `mix`, both smoothed.

    The recent counts get `pseudocount` per class; a baseline mix from `mix_samples` observed
    samples gets the same, an exact reference mix (`mix_samples` 0) an equivalent floor, so a class
    missing on one side adds a bounded term instead of infinity.
    """
    labels = sorted(set(counts) | set(mix))
    k = len(labels)
    n = sum(counts.values())
    m = mix_samples if mix_samples > 0 else max(n, 1)
    p_total, q_total = n + pseudocount * k, m + pseudocount * k
    # Plain floats: a dozen classes, scored for every telemetry window; numpy's per-call cost dominated.
    value = 0.0
    for lb in labels:
        p = (counts.get(lb, 0) + pseudocount) / p_total
        q = (mix.get(lb, 0.0) * m + pseudocount) / q_total
        value += (p - q) * math.log(p / q)
    return value


def psi_noise(classes: int, n: int, mix_samples: int) -> float:
    """The PSI two samples of one class mix show from sampling alone (module docstring)."""
    if n <= 0:
        return 0.0
    return max(classes - 1, 0) * (1.0 / n + (1.0 / mix_samples if mix_samples > 0 else 0.0))


def score_all(settings: DriftSettings, baseline: Baseline, recent: Pool) -> list[Score]:
    """Every score that can be computed now (too few samples or no baseline statistics: none)."""
    s = settings
    if recent.samples < s.min_samples:
        return []
    out = [_prediction(s, baseline, recent)]
    stats = baseline.stats
    if stats is None:
        return out
    conf = _confidence(s, stats, recent)
    feat = _features(s, stats, recent)
    lat = _latency(s, stats, recent)
    out.extend(x for x in (conf, feat, lat) if x is not None)
    return out


def _prediction(s: DriftSettings, baseline: Baseline, recent: Pool) -> Score:
    raw = psi(recent.classes, baseline.class_mix, baseline.class_samples, s.psi_pseudocount)
    classes = len(set(recent.classes) | set(baseline.class_mix))
    noise = psi_noise(classes, sum(recent.classes.values()), baseline.class_samples)
    value = max(raw - noise, 0.0)
    top = max(recent.classes.items(), key=lambda kv: kv[1], default=("-", 0))
    share = top[1] / recent.samples if recent.samples else 0.0
    base_share = baseline.class_mix.get(top[0], 0.0)
    detail = (
        f"PSI {raw:.3f} ({raw - value:.3f} of it sampling noise) over {recent.windows} windows "
        f"({recent.samples} inferences) vs {baseline.source} mix; "
        f"top class {top[0]!r} {share:.0%} (baseline {base_share:.0%})"
    )
    return Score("prediction_drift", value, s.psi_high, s.psi_low, detail)


def _confidence(s: DriftSettings, base: Pool, recent: Pool) -> Score | None:
    if base.confidence is None or recent.confidence is None:
        return None
    drop = base.confidence - recent.confidence
    detail = f"mean confidence {recent.confidence:.3f} vs baseline {base.confidence:.3f} (drop {drop:+.3f})"
    return Score("confidence_drift", drop, s.confidence_drop_high, s.confidence_drop_low, detail)


def _features(s: DriftSettings, base: Pool, recent: Pool) -> Score | None:
    bm, bs, rm, rs = base.feature_mean, base.feature_std, recent.feature_mean, recent.feature_std
    if bm is None or bs is None or rm is None or rs is None or len(bm) != len(rm):
        return None
    se = np.sqrt(np.square(bs) / base.feature_n + np.square(rs) / recent.feature_n)
    diff = np.abs(rm - bm)
    # Features constant in both pools (se 0): no evidence either way unless the constant moved.
    z = np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(diff > 1e-9, np.inf, 0.0))
    beyond = int(np.count_nonzero(z > s.feature_z))
    fraction = beyond / len(z)
    worst = int(np.argmax(z))
    detail = (
        f"{beyond}/{len(z)} features beyond |z|>{s.feature_z:g} "
        f"(max |z| {min(float(z[worst]), 1e9):.1f} at feature {worst}; n {recent.feature_n} vs {base.feature_n})"
    )
    return Score("feature_drift", fraction, s.feature_fraction_high, s.feature_fraction_low, detail)


def _latency(s: DriftSettings, base: Pool, recent: Pool) -> Score | None:
    if base.latency_p95 is None or recent.latency_p95 is None:
        return None
    high = min(max(s.latency_ratio_high * base.latency_p95, s.latency_floor_ms), s.latency_budget_ms)
    low = min(max(s.latency_ratio_low * base.latency_p95, s.latency_floor_ms), s.latency_budget_ms)
    low = min(low, high)
    detail = (
        f"p95 {recent.latency_p95:.3f} ms (median of {recent.windows} windows) vs baseline "
        f"{base.latency_p95:.3f} ms; limit {high:.3f} ms = min({s.latency_ratio_high:g}x baseline, "
        f"budget {s.latency_budget_ms:g} ms)"
    )
    return Score("latency", recent.latency_p95, high, low, detail)


# ---- hysteresis and cool-down --------------------------------------------------------------------
@dataclass
class KindState:
    """One kind's alert state for one (device, model version); stored as a row between batches."""

    firing: bool = False
    above: int = 0
    below: int = 0
    episode: int = 0
    cooldown_until: float = 0.0
    fired_at: float = 0.0
    score: float = 0.0  # the latest score and the window it was computed at (for operators)
    window_end: float = 0.0


@dataclass(frozen=True)
class Transition:
    kind: Kind
    state: Literal["firing", "resolved"]
    episode: int
    score: Score
    window_start: float
    window_end: float


def step(settings: DriftSettings, state: KindState, score: Score, recent: Pool) -> Transition | None:
    """Advance one kind's state by one evaluation; return the alert transition it causes, if any."""
    return step_at(settings, state, score, recent.window_start, recent.window_end)


def step_at(
    settings: DriftSettings, state: KindState, score: Score, window_start: float, window_end: float
) -> Transition | None:
    """`step` for a recent pool spanning `window_start` .. `window_end`."""
    state.score, state.window_end = score.score, window_end
    if not state.firing:
        state.above = state.above + 1 if score.score > score.high else 0
        if state.above >= settings.fire_after and window_end >= state.cooldown_until:
            state.firing, state.above, state.below = True, 0, 0
            state.episode += 1
            state.fired_at = window_end
            return Transition(score.kind, "firing", state.episode, score, window_start, window_end)
        return None
    state.below = state.below + 1 if score.score < score.low else 0
    if state.below >= settings.resolve_after:
        state.firing, state.above, state.below = False, 0, 0
        state.cooldown_until = window_end + settings.cooldown_s
        return Transition(score.kind, "resolved", state.episode, score, state.fired_at, window_end)
    return None


@dataclass
class Detector:
    """An in-memory detector for one (device, model version): the same maths as the bridge's stored
    state, for benches and offline analysis (the bridge keeps this state in its database instead)."""

    settings: DriftSettings
    baseline: Baseline | None = None
    windows: list[WindowStats] = field(default_factory=list)
    states: dict[Kind, KindState] = field(default_factory=dict)

    def add(self, window: WindowStats) -> tuple[list[Score], list[Transition]]:
        if window.count <= 0:
            return [], []
        self.windows.append(window)
        s = self.settings
        if (self.baseline is None or not self.baseline.ready) and baseline_complete(s, self.windows):
            self.baseline = complete_baseline(self.baseline, self.windows)
        if self.baseline is None:
            return [], []
        if self.baseline.ready:
            del self.windows[: max(0, len(self.windows) - s.recent_windows)]
        recent = pool(self.windows[-s.recent_windows :])
        scores = score_all(s, self.baseline, recent)
        transitions = [
            t for sc in scores if (t := step(s, self.states.setdefault(sc.kind, KindState()), sc, recent)) is not None
        ]
        return scores, transitions
