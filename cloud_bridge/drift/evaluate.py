"""Scored jobs through each kind's alert hysteresis, with their TSDB lines.

`step_scores` is `step_at` (cloud_bridge/drift/scoring.py) for a whole batch's `Scores`
(cloud_bridge/drift/batch.py): the comparisons with the thresholds, the finite scores stored in the
state and the lines' timestamps are computed for every job at once in numpy, and the loop left per
job and kind only moves counters and formats the line (the same text as
`tsdb.lines.drift_line_for`). `step_scored` is the per-window path (`score_all`'s `Score` objects
through `step_at`): the reference the batched path is tested against.

A kind's state keeps its latest score finite (`codec.finite`), as it is stored and shown.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cloud_bridge.drift.batch import Job, Scored, Scores
from cloud_bridge.drift.codec import SCORE_LIMIT, finite
from cloud_bridge.drift.scoring import KINDS, DriftSettings, Kind, KindState, Score, Transition, step_at
from cloud_bridge.drift.state import Key, KeyState
from cloud_bridge.tsdb.lines import drift_line_for, drift_tags

# Per column of `Scores`: the kind and its escaped metric tag (what drift_line_for writes).
_COLUMNS: tuple[tuple[int, Kind, str], ...] = tuple((k, kind, f",metric={kind}") for k, kind in enumerate(KINDS))

Stepped = tuple[Key, Job, Transition]


def kind_state(st: KeyState, kind: Kind) -> KindState:
    """The state of `kind`, made on its first score (the state's kinds stay sorted by name, as stored)."""
    found = st.kinds.get(kind)
    if found is None:
        found = KindState()
        st.kinds = dict(sorted({**st.kinds, kind: found}.items()))
    return found


def _tags(key: Key, st: KeyState) -> tuple[str, str]:
    tags = st.tags
    if tags is None:
        tags = st.tags = drift_tags(*key)
    return tags


def step_scores(
    settings: DriftSettings, items: Sequence[tuple[Key, KeyState, Job]], scores: Scores, lines: list[str]
) -> list[Stepped]:
    """Advance every job's kinds by its scores; append a drift line per score; the transitions."""
    values = scores.values
    with np.errstate(invalid="ignore"):  # NaN compares false, as in step_at
        over = (values > scores.high).ravel().tolist()
        under = (values < scores.low).ravel().tolist()
    shown = np.clip(np.nan_to_num(values, nan=0.0, posinf=SCORE_LIMIT, neginf=-SCORE_LIMIT), -SCORE_LIMIT, SCORE_LIMIT)
    # Flat lists (job i, kind k at i * 4 + k): a list per job would be thousands of objects per
    # batch for the garbage collector to count and visit.
    present = scores.present.ravel().tolist()
    raw, finite_scores = values.ravel().tolist(), shown.ravel().tolist()
    high, low = scores.high.ravel().tolist(), scores.low.ravel().tolist()
    starts, ends = scores.window_start.tolist(), scores.window_end.tolist()
    fire_after, resolve_after, cooldown = settings.fire_after, settings.resolve_after, settings.cooldown_s
    out: list[Stepped] = []
    add_line = lines.append
    width = len(KINDS)
    for i, (key, st, job) in enumerate(items):
        head, tail = _tags(key, st)
        end = ends[i]
        stamp = round(end * 1000)
        base = i * width
        for k, kind, metric in _COLUMNS:
            at = base + k
            if not present[at]:
                continue
            ks = st.kinds.get(kind) or kind_state(st, kind)
            ks.score = score = finite_scores[at]
            ks.window_end = end
            if not ks.firing:
                ks.above = ks.above + 1 if over[at] else 0
                if ks.above >= fire_after and end >= ks.cooldown_until:
                    ks.firing, ks.above, ks.below = True, 0, 0
                    ks.episode += 1
                    ks.fired_at = end
                    sc = Score(kind, raw[at], high[at], low[at], "")
                    out.append((key, job, Transition(kind, "firing", ks.episode, sc, starts[i], end)))
            else:
                ks.below = ks.below + 1 if under[at] else 0
                if ks.below >= resolve_after:
                    ks.firing, ks.above, ks.below = False, 0, 0
                    ks.cooldown_until = end + cooldown
                    sc = Score(kind, raw[at], high[at], low[at], "")
                    out.append((key, job, Transition(kind, "resolved", ks.episode, sc, ks.fired_at, end)))
            if ks.firing:
                add_line(f"drift{head}{metric}{tail} score={score!r},threshold={low[at]!r},firing=1i {stamp}")
            else:
                add_line(f"drift{head}{metric}{tail} score={score!r},threshold={high[at]!r},firing=0i {stamp}")
    return out


def step_scored(
    settings: DriftSettings, key: Key, st: KeyState, job: Job, result: Scored, lines: list[str]
) -> list[Stepped]:
    """`step_scores` for one job scored by the per-window path, through `step_at` and `drift_line_for`."""
    out: list[Stepped] = []
    tags = _tags(key, st)
    for score in result.scores:
        ks = kind_state(st, score.kind)
        transition = step_at(settings, ks, score, result.window_start, result.window_end)
        ks.score = finite(ks.score)
        threshold = score.low if ks.firing else score.high
        lines.append(drift_line_for(tags, score.kind, finite(score.score), threshold, ks.firing, result.window_end))
        if transition is not None:
            out.append((key, job, transition))
    return out
