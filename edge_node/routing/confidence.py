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

from common.numeric import softmax
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


def decide_scores(scores: npt.NDArray[Any], output_kind: str, confidence_threshold: float) -> BatchDecision:
    """`decide` on a model's own output for a batch of N ([N, C], or [N, C, 1, 1] and the like).

    Logits take `decide_logits`: the softmax and the measures share their steps."""
    flat = np.asarray(scores, dtype=np.float32).reshape(scores.shape[0], -1)
    if output_kind == "logits":
        return decide_logits(flat, confidence_threshold)
    return decide(flat, confidence_threshold)


def decide_logits(logits: npt.NDArray[np.float32], confidence_threshold: float) -> BatchDecision:
    """`decide(softmax(logits))` with the softmax and the measures sharing their steps: 12 numpy
    calls instead of 20, each 1-4 µs on a small batch (16.7 against 23.4 µs for 64 x 10 here).

    The top two logits (one partition) give everything about the top two probabilities: with
    z = logits - top1 and s = sum(exp(z)), confidence is 1 / s, the margin (1 - exp(top2 - top1)) / s,
    and entropy log(s) - sum(p * z) (the log-probabilities are z - log(s), exact even where exp
    underflows to 0). Probabilities of a softmax lie within [0, 1] by construction, so nothing
    needs the clamps `decide` applies to a model's own "probabilities"."""
    c = logits.shape[1]
    if c < 2:
        return decide(softmax(logits), confidence_threshold)
    top2 = np.partition(logits, c - 2, axis=1)[:, c - 2 :]
    z = logits - top2[:, 1:]
    e = np.exp(z)
    s = e.sum(axis=1)
    confidence = _ONE / s
    probs: npt.NDArray[np.float32] = e * confidence[:, None]
    return BatchDecision(
        probs=probs,
        top1=logits.argmax(axis=1),
        confidence=confidence,
        margin=(_ONE - np.exp(top2[:, 0] - top2[:, 1])) * confidence,
        entropy=np.maximum(np.log(s) - np.einsum("ij,ij->i", probs, z), _ZERO),
        confident=confidence >= np.float32(confidence_threshold),
    )


def top_k(row: npt.NDArray[Any], labels: tuple[str, ...], k: int) -> list[TopK]:
    """The k most probable classes of one row, most probable first."""
    k = min(k, row.shape[0])
    idx = np.argpartition(row, -k)[-k:]
    idx = idx[np.argsort(row[idx])[::-1]]
    return [TopK(label=labels[i], index=int(i), prob=float(min(max(row[i], 0.0), 1.0))) for i in idx]
