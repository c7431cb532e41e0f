"""Numerics both programs and the demo kit share: the one row-wise softmax.

Each program used to carry its own copy (the edge in float32 for its probabilities, the cloud and
the demo kit in float64 for escalation answers and the OTA health reference); the steps are the
same, only the precision differs, so the precision is a parameter. The edge's hot path does not
come here for logits: edge_node/routing/confidence.py `decide_logits` fuses the softmax with the
routing measures.
"""

from __future__ import annotations

from typing import Any, TypeVar, overload

import numpy as np
import numpy.typing as npt

_Float = TypeVar("_Float", bound=np.floating[Any])


@overload
def softmax(scores: npt.ArrayLike) -> npt.NDArray[np.float32]: ...


@overload
def softmax(scores: npt.ArrayLike, dtype: type[_Float]) -> npt.NDArray[_Float]: ...


def softmax(scores: npt.ArrayLike, dtype: type[np.floating[Any]] = np.float32) -> npt.NDArray[Any]:
    """Row-wise softmax of [N, C] scores (logits), computed in `dtype` (float32 unless asked).

    The row maximum is subtracted first, so no exp overflows; a row whose other entries underflow
    to 0 gives 1.0 for its maximum."""
    x = np.asarray(scores, dtype=dtype)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    out: npt.NDArray[Any] = e / e.sum(axis=1, keepdims=True)
    return out
