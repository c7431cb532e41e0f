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


def decide(probs: npt.NDArray[np.float32], confidence_threshold: float) -> BatchDecision:
    """Vectorised top-1, confidence, margin, entropy and the confident mask."""
    c = probs.shape[1]
    if c >= 2:
        top2 = np.partition(probs, c - 2, axis=1)[:, c - 2 :]
        confidence = top2[:, 1].astype(np.float32)
        margin = (top2[:, 1] - top2[:, 0]).astype(np.float32)
    else:
        confidence = probs[:, 0].astype(np.float32)
        margin = confidence.copy()
    top1 = probs.argmax(axis=1)
    clipped = np.clip(probs, 1e-12, 1.0)
    entropy = np.maximum(-(probs * np.log(clipped)).sum(axis=1), 0.0).astype(np.float32)
    return BatchDecision(
        probs=probs,
        top1=top1,
        confidence=confidence,
        margin=np.clip(margin, 0.0, 1.0),
        entropy=entropy,
        confident=confidence >= np.float32(confidence_threshold),
    )


def top_k(row: npt.NDArray[Any], labels: tuple[str, ...], k: int) -> list[TopK]:
    """The k most probable classes of one row, most probable first."""
    k = min(k, row.shape[0])
    idx = np.argpartition(row, -k)[-k:]
    idx = idx[np.argsort(row[idx])[::-1]]
    return [TopK(label=labels[i], index=int(i), prob=float(min(max(row[i], 0.0), 1.0))) for i in idx]
