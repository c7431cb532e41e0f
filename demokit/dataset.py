"""The demo dataset: scikit-learn's bundled hand-written digits, split for training and replay.

The data is ``sklearn.datasets.load_digits``: the test set of the UCI ML "Optical Recognition of
Handwritten Digits" dataset (E. Alpaydin, C. Kaynak, 1998), 1,797 images of 8x8 pixels with integer
values 0..16, licensed CC BY 4.0 (https://archive.ics.uci.edu/dataset/80). It ships inside the
scikit-learn wheel, so nothing is downloaded.

It is read with numpy, and split the way scikit-learn's `train_test_split` does, without importing
scikit-learn: the replay source of an edge node loads this module, and importing scikit-learn
(with scipy) would cost the node about 60 MiB and 0.8 s of start-up for 1,797 rows.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

DATASET_NAME = "sklearn digits (UCI ML hand-written digits, test set)"
DATASET_LICENCE = "CC BY 4.0"
DIGITS_CSV = "digits.csv.gz"  # in sklearn/datasets/data/
NUM_FEATURES = 64
PIXEL_MAX = 16.0
LABELS: tuple[str, ...] = tuple(str(digit) for digit in range(10))

_Scalar = TypeVar("_Scalar", bound=np.generic)


@dataclass(frozen=True)
class DigitsSplit:
    """A deterministic, stratified train/test split of the digits.

    Features are raw pixel values (float32, shape [N, 64], 0..16, row-major 8x8); labels are int64
    class indices into ``labels``. The arrays are read-only so a shared split cannot be altered.
    """

    X_train: NDArray[np.float32]
    y_train: NDArray[np.int64]
    X_test: NDArray[np.float32]
    y_test: NDArray[np.int64]
    labels: tuple[str, ...] = LABELS


def _read_only(array: NDArray[_Scalar]) -> NDArray[_Scalar]:
    array.setflags(write=False)
    return array


def load_digits_split(seed: int = 0, test_fraction: float = 0.3) -> DigitsSplit:
    """Load the bundled digits and split them, stratified by class, reproducibly for ``seed``.

    The same split as scikit-learn's ``train_test_split(..., test_size=test_fraction,
    stratify=targets, random_state=seed)`` (tests/test_demo_models.py checks it against
    scikit-learn), computed with numpy alone: a replaying edge node loads no scikit-learn (about
    60 MiB and 0.8 s of imports) to read 1,797 rows.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    features, targets = load_digits_arrays()
    train, test = stratified_split(targets, test_fraction, seed)
    logger.debug("digits split seed=%d train=%d test=%d", seed, len(train), len(test))
    return DigitsSplit(
        X_train=_read_only(np.ascontiguousarray(features[train])),
        y_train=_read_only(np.ascontiguousarray(targets[train])),
        X_test=_read_only(np.ascontiguousarray(features[test])),
        y_test=_read_only(np.ascontiguousarray(targets[test])),
    )


def digits_file() -> Path:
    """The digits CSV inside the installed scikit-learn package, found without importing it."""
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "datasets" / "data" / DIGITS_CSV
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the digits data ({DIGITS_CSV}) ships with scikit-learn, which is not installed here;"
        " fix: pip install -e '.[demo]'"
    )


def load_digits_arrays() -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Every digit as (features float32 [1797, 64], targets int64 [1797]), in the file's order
    (as ``sklearn.datasets.load_digits`` returns them)."""
    data = np.loadtxt(digits_file(), delimiter=",")
    return np.ascontiguousarray(data[:, :-1], dtype=np.float32), data[:, -1].astype(np.int64)


def stratified_split(
    targets: NDArray[np.int64], test_fraction: float, seed: int
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """(train, test) row indices: scikit-learn's StratifiedShuffleSplit (one split, `random_state`
    = seed) step by step, drawing from the same numpy RandomState in the same order."""
    n = len(targets)
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    _, inverse, counts = np.unique(targets, return_inverse=True, return_counts=True)
    if counts.min() < 2 or min(n_train, n_test) < len(counts):
        raise ValueError(f"cannot stratify {n} rows of {len(counts)} classes with test_fraction {test_fraction}")
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train: list[np.intp] = []
    test: list[np.intp] = []
    for members, take_train, take_test in zip(by_class, n_i, t_i, strict=True):
        shuffled = members.take(rng.permutation(len(members)), mode="clip")
        train.extend(shuffled[:take_train])
        test.extend(shuffled[take_train : take_train + take_test])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(counts: NDArray[np.int64], draws: int, rng: np.random.RandomState) -> NDArray[np.int64]:
    """Rows per class for `draws` rows in proportion to `counts`: the floors, then one more for
    the largest remainders, ties broken at random (scikit-learn's `_approximate_mode`)."""
    continuous: NDArray[np.float64] = counts / counts.sum() * draws
    floored: NDArray[np.float64] = np.floor(continuous)
    need = int(draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            add = min(len(tied), need)
            floored[rng.choice(tied, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(np.int64)
