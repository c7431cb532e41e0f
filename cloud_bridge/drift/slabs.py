"""Every window's and baseline's numbers as rows of shared arrays, written once, gathered per batch.

A window is in `recent_windows` consecutive pools of its device, and a baseline is scored against for
the life of its model version. Turning each into array rows once leaves, per window and batch, one
dictionary lookup in Python (`WindowCache.rows`): the batch gathers its rows by index (numpy fancy
indexing) and does the arithmetic on whole arrays (cloud_bridge/drift/batch.py). New windows are
written together, one array operation per column for all of a batch's (`flush`).

Class labels become columns of one vocabulary. A window's labels are a run of (column, count) pairs
in one flat array (a dense row per window would cost memory in proportion to every label any device
ever reported); runs of windows that left are reclaimed by compacting it when it fills.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from cloud_bridge.drift.scoring import Baseline
from cloud_bridge.drift.windows import WindowStats

# Columns of a window's row.
W_COUNT, W_CONF, W_LAT, W_FN, W_DIMS, W_FROW, W_NLAB, W_START, W_END, W_LABELS = range(10)
# Columns of a baseline's row.
B_SAMPLES, B_CONF, B_LAT, B_FN, B_DIMS, B_FROW, B_NMIX = range(7)

# Labels are device-reported strings: past this many the vocabulary (and every cached row) is
# rebuilt from what is still in use, so a device inventing labels cannot grow it without bound.
_MAX_LABELS = 50_000
_EMPTY = np.zeros((2, 0))


class _Windowed(Protocol):
    """What `rows` needs of a job (cloud_bridge/drift/batch.py Job)."""

    @property
    def baseline(self) -> Baseline: ...

    @property
    def windows(self) -> Sequence[WindowStats]: ...


class Rows:
    """Rows of a float64 array handed out and taken back; the array doubles when full."""

    def __init__(self, width: int, capacity: int = 256) -> None:
        self.data = np.zeros((capacity, width))
        self._free: list[int] = []
        self._next = 0

    def take(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next == len(self.data):
            self.data = np.concatenate([self.data, np.zeros_like(self.data)])
        self._next += 1
        return self._next - 1

    def give(self, row: int) -> None:
        self._free.append(row)


class WindowCache:
    """Rows of windows and baselines by object identity (bounded: the oldest made go first). A
    cached object is kept alive with its row, so its id cannot be reused while it is cached."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._reset()

    def _reset(self) -> None:
        self.labels: dict[str, int] = {}
        self.windows: dict[int, int] = {}  # id -> row
        self._objects: dict[int, WindowStats] = {}  # row -> window
        self.baselines: dict[int, tuple[Baseline, int, np.ndarray]] = {}  # id -> (baseline, row, mix)
        self.window_rows = Rows(10)
        self.base_rows = Rows(7)
        # Per feature width: windows' count-weighted moments (n*mean, n*(std^2+mean^2)), and
        # baselines' means and standard deviations.
        self.window_features: dict[int, Rows] = {}
        self.base_features: dict[int, Rows] = {}
        self.label_runs = np.zeros((2, 4096))  # (column, count) of every cached window's labels
        self._label_end = 0
        self._pending: list[tuple[WindowStats, int]] = []  # new windows, written by `flush`

    # ---- a batch's rows --------------------------------------------------------------------------
    def rows(self, jobs: Sequence[_Windowed]) -> tuple[list[int], list[int], list[np.ndarray]]:
        """The rows of every job's windows (grouped by job, in order), each job's baseline row and
        its class mix as (column, share) pairs; windows seen for the first time are written now."""
        get = self.windows.get
        windows = [w for job in jobs for w in job.windows]
        rows = list(map(get, map(id, windows)))
        try:
            if None in rows:
                for i, row in enumerate(rows):
                    if row is None:
                        rows[i] = self._add(windows[i])
            self.flush()
        except (ValueError, TypeError, ArithmeticError):
            self.discard()
            raise
        base_rows: list[int] = []
        mixes: list[np.ndarray] = []
        for job in jobs:
            entry = self.baselines.get(id(job.baseline)) or self._baseline(job.baseline)
            base_rows.append(entry[1])
            mixes.append(entry[2])
        return rows, base_rows, mixes  # type: ignore[return-value]  # no None left

    def label_pairs(self, table: np.ndarray) -> np.ndarray:
        """The (column, count) pairs (2 x n) of the labels of these window rows (gathered from
        `window_rows.data`), run after run."""
        lens = table[:, W_NLAB].astype(np.intp)
        ends = np.cumsum(lens)
        total = int(ends[-1]) if len(ends) else 0
        index = np.repeat(table[:, W_LABELS].astype(np.intp) - (ends - lens), lens) + np.arange(total)
        return self.label_runs[:, index]

    # ---- windows ---------------------------------------------------------------------------------
    def _add(self, w: WindowStats) -> int:
        row = self.windows.get(id(w))  # the same window twice in a batch
        if row is None:
            row = self.windows[id(w)] = self.window_rows.take()
            self._objects[row] = w
            self._pending.append((w, row))
        return row

    def flush(self) -> None:
        """Write the rows of the windows added since the last flush: one array operation per column
        and feature width for all of them, instead of a dozen small ones per window."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        taken: list[tuple[Rows, int]] = []
        try:
            self._write(pending, taken)
        except (ValueError, TypeError, ArithmeticError):
            for rows, row in taken:
                rows.give(row)
            self._pending = pending
            raise

    def discard(self) -> None:
        """Forget the windows added since the last flush (their batch failed before it)."""
        pending, self._pending = self._pending, []
        for w, row in pending:
            del self.windows[id(w)]
            del self._objects[row]
            self.window_rows.give(row)

    def _write(self, pending: list[tuple[WindowStats, int]], taken: list[tuple[Rows, int]]) -> None:
        nan = float("nan")
        names: list[str] = []
        counts: list[Any] = []
        values = []
        for w, _ in pending:
            classes = w.classes
            names.extend(classes)
            counts.extend(classes.values())
            values.append(
                (
                    w.count,
                    nan if w.confidence is None else w.confidence,
                    nan if w.latency_p95 is None else w.latency_p95,
                    w.feature_n,
                    0.0,
                    -1.0,
                    len(classes),
                    w.window_start,
                    w.window_end,
                    0.0,
                )
            )
        table = np.array(values, dtype=np.float64)
        vocabulary = self.labels
        pairs = np.array(([vocabulary.setdefault(lb, len(vocabulary)) for lb in names], counts), dtype=np.float64)
        widths: dict[int, list[int]] = {}
        for i, (w, _) in enumerate(pending):
            mean, std = w.feature_mean, w.feature_std
            if w.feature_n > 0 and mean is not None and std is not None and len(mean):
                if len(std) != len(mean):
                    raise ValueError(f"feature_mean has {len(mean)} values but feature_std {len(std)}")
                widths.setdefault(len(mean), []).append(i)
        for dims, members in widths.items():
            mean = np.array([pending[i][0].feature_mean for i in members], dtype=np.float64)
            std = np.array([pending[i][0].feature_std for i in members], dtype=np.float64)
            rows = self.window_features.get(dims)
            if rows is None:
                rows = self.window_features[dims] = Rows(2 * dims)
                rows.take()  # row 0 stays zeros: batch.py pads with it
            frows = [rows.take() for _ in members]
            taken.extend((rows, r) for r in frows)
            n = table[members, W_FN][:, None]
            rows.data[frows, :dims] = mean * n  # count-weighted moments, as pooling sums them
            rows.data[frows, dims:] = (std * std + mean * mean) * n
            table[members, W_DIMS] = dims
            table[members, W_FROW] = frows
        # Nothing fails past here: the label runs go at the end of the flat array.
        start = self._room(pairs.shape[1], {row for _, row in pending})
        self.label_runs[:, start : start + pairs.shape[1]] = pairs
        self._label_end = start + pairs.shape[1]
        table[:, W_LABELS] = start + np.cumsum(table[:, W_NLAB]) - table[:, W_NLAB]
        self.window_rows.data[[row for _, row in pending]] = table

    def _room(self, size: int, pending: set[int]) -> int:
        """Where `size` more label pairs go: at the end, after compacting the runs of cached windows
        (and growing the array) when they do not fit. `pending`: rows not written yet."""
        if self._label_end + size <= self.label_runs.shape[1]:
            return self._label_end
        live = np.fromiter((r for r in self.windows.values() if r not in pending), dtype=np.intp)
        data = self.window_rows.data
        if len(live):
            pairs_of_live = self.label_pairs(data[live])
            kept = int(pairs_of_live.shape[1])
            lens = data[live, W_NLAB]
            data[live, W_LABELS] = np.cumsum(lens) - lens
        else:
            pairs_of_live, kept = _EMPTY, 0
        capacity = self.label_runs.shape[1]
        while kept + size > capacity // 2:
            capacity *= 2
        runs = np.zeros((2, capacity))
        runs[:, :kept] = pairs_of_live
        self.label_runs = runs
        self._label_end = kept
        return kept

    def forget(self, windows: Iterable[WindowStats]) -> None:
        """Drop the entries of windows that left their pool (no job will gather them again): the
        cache then holds about the recent pools, not every window until its capacity."""
        for w in windows:
            row = self.windows.pop(id(w), None)
            if row is not None:
                self._release_window(row)

    def _release_window(self, row: int) -> None:
        del self._objects[row]
        _release(row, self.window_rows, self.window_features, W_DIMS, W_FROW)

    # ---- baselines -------------------------------------------------------------------------------
    def _baseline(self, b: Baseline) -> tuple[Baseline, int, np.ndarray]:
        vocabulary = self.labels
        mix = (
            np.array(([vocabulary.setdefault(lb, len(vocabulary)) for lb in b.class_mix], list(b.class_mix.values())))
            if b.class_mix
            else _EMPTY
        )
        nan = float("nan")
        values = [float(b.class_samples), nan, nan, 0.0, 0.0, -1.0, float(mix.shape[1])]
        stats = b.stats
        both: np.ndarray | None = None
        if stats is not None:
            values[B_CONF] = nan if stats.confidence is None else float(stats.confidence)
            values[B_LAT] = nan if stats.latency_p95 is None else float(stats.latency_p95)
            values[B_FN] = float(stats.feature_n)
            mean, std = stats.feature_mean, stats.feature_std
            if mean is not None and std is not None and len(mean) and len(std) == len(mean):
                both = np.concatenate([mean, std]).astype(np.float64, copy=False)
        if both is not None:
            dims = len(both) // 2
            rows = self.base_features.get(dims)
            if rows is None:
                rows = self.base_features[dims] = Rows(2 * dims)
            frow = rows.take()
            rows.data[frow] = both
            values[B_DIMS], values[B_FROW] = float(dims), float(frow)
        row = self.base_rows.take()
        self.base_rows.data[row] = values
        entry = self.baselines[id(b)] = (b, row, mix)
        return entry

    # ---- bounds ----------------------------------------------------------------------------------
    def trim(self) -> None:
        """Drop the oldest entries past the capacity (between batches: rows in use stay valid)."""
        assert not self._pending, "flush or discard before trim"
        if len(self.labels) > _MAX_LABELS:
            self._reset()
            return
        if len(self.windows) > self.capacity:
            for key in list(self.windows)[: len(self.windows) - self.capacity + self.capacity // 4]:
                self._release_window(self.windows.pop(key))
        limit = self.capacity // 4
        if len(self.baselines) > limit:
            for key in list(self.baselines)[: len(self.baselines) - limit + limit // 4]:
                _release(self.baselines.pop(key)[1], self.base_rows, self.base_features, B_DIMS, B_FROW)


def _release(row: int, rows: Rows, features: dict[int, Rows], dims: int, frow: int) -> None:
    width = int(rows.data[row, dims])
    if width:
        features[width].give(int(rows.data[row, frow]))
    rows.give(row)
