"""The checks a batch's inputs pass before the model runs: shape, dtype, finite values.

The common case (every input already is what the model takes) is checked for the whole batch at
once (`stack_if_clean`); otherwise each input is checked on its own (`check_each`, with
`Classifier.check_input`), and only the bad ones are rejected, each saying why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_node.errors import InputRejected
from edge_node.inference.model import Classifier
from edge_node.input.intake import InputItem


def check_each(
    items: list[InputItem], classifier: Classifier, reject: Callable[[InputItem, InputRejected], None]
) -> tuple[list[InputItem], npt.NDArray[Any] | None]:
    """Input by input (when `stack_if_clean` found the batch not clean): the inputs the model can
    take and their batch (None when there are none); `reject` hears about each other input (its
    `error` is set)."""
    good: list[InputItem] = []
    arrays: list[npt.NDArray[Any]] = []
    for item in items:
        try:
            if item.error is not None:
                raise item.error
            if item.array is None:
                raise InputRejected("undecodable", "no data")
            arrays.append(classifier.check_input(item.array))
            good.append(item)
        except InputRejected as exc:
            item.error = exc
            reject(item, exc)
    return good, (np.stack(arrays) if arrays else None)


def stack_if_clean(items: list[InputItem], classifier: Classifier) -> npt.NDArray[Any] | None:
    """The batch in one vectorised check, for the common case: every input already has exactly the
    model's shape and dtype and no NaN/inf. Anything else returns None, and the per-input checks
    (`Classifier.check_input`) reject just the bad ones, saying why; ~4 µs per input saved."""
    info = classifier.info
    dtype, shape = info.input_dtype, info.feature_shape
    arrays = [item.array for item in items]
    if any(item.error is not None for item in items) or not all(
        type(x) is np.ndarray and x.dtype == dtype and x.shape == shape for x in arrays
    ):
        return None
    clean: list[npt.NDArray[Any]] = arrays  # type: ignore[assignment]  # all ndarrays, checked above
    # One concatenate (~5x cheaper than np.stack, which reshapes each input first); 0-d inputs
    # cannot be concatenated: the per-input path takes those.
    try:
        batch = np.concatenate(clean).reshape((len(clean), *shape))
    except ValueError:
        return None
    if batch.dtype.kind == "f" and not np.isfinite(batch).all():
        return None
    return batch
