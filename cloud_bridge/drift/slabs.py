"""Every window's and baseline's numbers as rows of shared arrays, written once, gathered per batch.

A window is in `recent_windows` consecutive pools of its device, and a baseline is scored against for
the life of its model version. Turning each into array rows once (`WindowCache.window` and
`WindowCache.baseline`) leaves, per window and batch, one dictionary lookup in Python: the batch
gathers its rows by index (numpy fancy indexing) and does the arithmetic on whole arrays
(cloud_bridge/drift/batch.py).

Class labels become columns of one vocabulary; a window keeps its labels as a small 2 x n array
(column, count), since a dense row per window would cost memory in proportion to every label any
device ever reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import numpy as np

from cloud_bridge.drift.scoring import Baseline
from cloud_bridge.drift.windows import WindowStats

# Columns of a window's row.
W_COUNT, W_CONF, W_LAT, W_FN, W_DIMS, W_FROW, W_NLAB, W_START, W_END = range(9)
# Columns of a baseline's row.
B_SAMPLES, B_CONF, B_LAT, B_FN, B_DIMS, B_FROW, B_NMIX = range(7)

# Labels are device-reported strings: past this many the vocabulary (and every cached row) is
# rebuilt from what is still in use, so a device inventing labels cannot grow it without bound.
_MAX_LABELS = 50_000
_EMPTY = np.zeros((2, 0))


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


# A cached window or baseline: the object (kept alive, so its id is not reused while cached), its
# row, and its labels as (column, count) or (column, mix share) pairs.
_Entry = tuple[object, int, np.ndarray]


class WindowCache:
    """Rows of windows and baselines by object identity (bounded: the oldest made go first)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._reset()

    def _reset(self) -> None:
        self.labels: dict[str, int] = {}
        self.windows: dict[int, _Entry] = {}
        self.baselines: dict[int, _Entry] = {}
        self.window_rows = Rows(9)
        self.base_rows = Rows(7)
        # Per feature width: windows' count-weighted moments (n*mean, n*(std^2+mean^2)), and
        # baselines' means and standard deviations.
        self.window_features: dict[int, Rows] = {}
        self.base_features: dict[int, Rows] = {}
        self._pending: list[_Entry] = []  # windows whose rows `flush` has still to write

    def window(self, w: WindowStats) -> _Entry:
        """The entry of `w`; a new one gets its rows now and their numbers at `flush` (in bulk)."""
        entry = self.windows.get(id(w))
        if entry is not None:
            return entry
        labels = self._labels_of(w.classes)
        entry = self.windows[id(w)] = (w, self.window_rows.take(), labels)
        self._pending.append(entry)
        return entry

    def flush(self) -> None:
        """Write the rows of the windows made since the last flush: one array operation per column
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
            for w, row, _ in pending:
                del self.windows[id(w)]
                self.window_rows.give(row)
            raise

    def _write(self, pending: list[_Entry], taken: list[tuple[Rows, int]]) -> None:
        windows = [cast(WindowStats, w) for w, _, _ in pending]
        nan = float("nan")
        values = np.array(
            [
                (
                    w.count,
                    nan if w.confidence is None else w.confidence,
                    nan if w.latency_p95 is None else w.latency_p95,
                    w.feature_n,
                    0.0,
                    -1.0,
                    labels.shape[1],
                    w.window_start,
                    w.window_end,
                )
                for w, (_, _, labels) in zip(windows, pending, strict=True)
            ],
            dtype=np.float64,
        )
        widths: dict[int, list[int]] = {}
        for i, w in enumerate(windows):
            mean, std = w.feature_mean, w.feature_std
            if w.feature_n > 0 and mean is not None and std is not None and len(mean):
                if len(std) != len(mean):
                    raise ValueError(f"feature_mean has {len(mean)} values but feature_std {len(std)}")
                widths.setdefault(len(mean), []).append(i)
        for dims, members in widths.items():
            mean = np.array([windows[i].feature_mean for i in members], dtype=np.float64)
            std = np.array([windows[i].feature_std for i in members], dtype=np.float64)
            rows = self.window_features.get(dims)
            if rows is None:
                rows = self.window_features[dims] = Rows(2 * dims)
            frows = [rows.take() for _ in members]
            taken.extend((rows, r) for r in frows)
            n = values[members, W_FN][:, None]
            rows.data[frows, :dims] = mean * n  # count-weighted moments, as pooling sums them
            rows.data[frows, dims:] = (std * std + mean * mean) * n
            values[members, W_DIMS] = dims
            values[members, W_FROW] = frows
        self.window_rows.data[[row for _, row, _ in pending]] = values

    def discard(self) -> None:
        """Forget the windows made since the last flush (their batch failed before it)."""
        pending, self._pending = self._pending, []
        for w, row, _ in pending:
            del self.windows[id(w)]
            self.window_rows.give(row)

    def _labels_of(self, classes: Mapping[str, Any]) -> np.ndarray:
        if not classes:
            return _EMPTY
        vocabulary = self.labels
        columns = [vocabulary.setdefault(lb, len(vocabulary)) for lb in classes]
        return np.array((columns, list(classes.values())), dtype=np.float64)

    def baseline(self, b: Baseline) -> _Entry:
        """The entry of `b`, made now if it is not cached."""
        entry = self.baselines.get(id(b))
        if entry is not None:
            return entry
        mix = self._labels_of(b.class_mix)
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

    def trim(self) -> None:
        """Drop the oldest entries past the capacity (between batches: rows in use stay valid)."""
        assert not self._pending, "flush or discard before trim"
        if len(self.labels) > _MAX_LABELS:
            self._reset()
            return
        _trim(self.windows, self.capacity, self.window_rows, self.window_features, W_DIMS, W_FROW)
        _trim(self.baselines, self.capacity // 4, self.base_rows, self.base_features, B_DIMS, B_FROW)


def _trim(
    entries: dict[int, _Entry], capacity: int, rows: Rows, features: dict[int, Rows], dims: int, frow: int
) -> None:
    if len(entries) <= capacity:
        return
    for key in list(entries)[: len(entries) - capacity + capacity // 4]:
        _, row, _ = entries.pop(key)
        width = int(rows.data[row, dims])
        if width:
            features[width].give(int(rows.data[row, frow]))
        rows.give(row)
