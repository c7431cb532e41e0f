"""Confidence routing and uncertainty measures, computed for a whole batch at once.

A row whose top-1 probability reaches `confidence_threshold` is final at the edge; any other row
is escalated to the cloud model. Entropy (nats) and margin (top-1 minus top-2 probability) feed
the uncertainty sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from schemas import TopK


@dataclass(frozen=True, slots=True)
class BatchDecision:
    """Per-row measures of one batch of probabilities [N, C]."""

    probs: npt.NDArray[np.float32]
    top1: npt.NDArray[np.intp]
    confidence: npt.NDArray[np.float32]
    margin: npt.NDArray[np.float32]
    entropy: npt.NDArray[np.float32]
    confident: npt.NDArray[np.bool_]

    def __len__(self) -> int:
        return int(self.top1.shape[0])


_TINY = np.float32(1e-12)
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


def decide(probs: npt.NDArray[np.float32], confidence_threshold: float) -> BatchDecision:
    """Vectorised top-1, confidence, margin, entropy and the confident mask.

    Confidence and margin are kept within [0, 1] (a model's "probabilities" may overshoot by a
    rounding error). Plain ufuncs on float32 throughout: np.clip and astype cost a Python-level
    call each, several microseconds per batch on the loop of a small device."""
    probs = np.asarray(probs, dtype=np.float32)
    c = probs.shape[1]
    if c >= 2:
        top2 = np.partition(probs, c - 2, axis=1)[:, c - 2 :]
        confidence = np.minimum(np.maximum(top2[:, 1], _ZERO), _ONE)
        margin = np.minimum(np.maximum(top2[:, 1] - top2[:, 0], _ZERO), _ONE)
    else:
        confidence = np.minimum(np.maximum(probs[:, 0], _ZERO), _ONE)
        margin = confidence.copy()
    top1 = probs.argmax(axis=1)
    plogp = probs * np.log(np.minimum(np.maximum(probs, _TINY), _ONE))
    entropy = np.maximum(-plogp.sum(axis=1), _ZERO)
    return BatchDecision(
        probs=probs,
        top1=top1,
        confidence=confidence,
        margin=margin,
        entropy=entropy,
        confident=confidence >= np.float32(confidence_threshold),
    )


def top_k(row: npt.NDArray[Any], labels: tuple[str, ...], k: int) -> list[TopK]:
    """The k most probable classes of one row, most probable first."""
    k = min(k, row.shape[0])
    idx = np.argpartition(row, -k)[-k:]
    idx = idx[np.argsort(row[idx])[::-1]]
    return [TopK(label=labels[i], index=int(i), prob=float(min(max(row[i], 0.0), 1.0))) for i in idx]
