"""The demo dataset: scikit-learn's bundled hand-written digits, split for training and replay.

The data is ``sklearn.datasets.load_digits``: the test set of the UCI ML "Optical Recognition of
Handwritten Digits" dataset (E. Alpaydin, C. Kaynak, 1998), 1,797 images of 8x8 pixels with integer
values 0..16, licensed CC BY 4.0 (https://archive.ics.uci.edu/dataset/80). It ships inside the
scikit-learn wheel, so nothing is downloaded.

scikit-learn is imported inside :func:`load_digits_split` only: importing this module stays cheap
for processes that never load the data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

DATASET_NAME = "sklearn digits (UCI ML hand-written digits, test set)"
DATASET_LICENCE = "CC BY 4.0"
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
    """Load the bundled digits and split them, stratified by class, reproducibly for ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    features = np.ascontiguousarray(bunch.data, dtype=np.float32)
    targets = np.ascontiguousarray(bunch.target, dtype=np.int64)
    X_train, X_test, y_train, y_test = train_test_split(
        features, targets, test_size=test_fraction, stratify=targets, random_state=seed
    )
    logger.debug("digits split seed=%d train=%d test=%d", seed, len(y_train), len(y_test))
    return DigitsSplit(
        X_train=_read_only(np.ascontiguousarray(X_train)),
        y_train=_read_only(np.ascontiguousarray(y_train)),
        X_test=_read_only(np.ascontiguousarray(X_test)),
        y_test=_read_only(np.ascontiguousarray(y_test)),
    )
