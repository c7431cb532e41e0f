"""Pseudo-labels: a teacher model (the cloud model, or any registered model) labels archived samples that
carry no human label, and only where it is at least `min_confidence` sure.

They go into `labels` with source `pseudo`, the teacher as `origin` and its confidence, beside (never
over) human labels: a dataset version takes them only when asked to, and records which source each
label came from (cloud_bridge/samples/datasets.py). Re-running relabels with the teacher given, so a
newer teacher replaces an older one's labels (revision + 1).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import insert, select, update

from cloud_bridge.registry import LabelRow, Registry, SampleRow
from cloud_bridge.samples.labels import HUMAN, PSEUDO, LabelImportError
from common.numeric import softmax
from common.onnx import load_model
from schemas.messages import Tensor
from schemas.tensor import decode_tensor

PAGE = 1000


@dataclass(frozen=True)
class PseudoStats:
    considered: int
    labeled: int
    below_threshold: int


def row_input(row: Any) -> NDArray[np.float32]:
    """A sample row's tensor as float32 [features] (the leading batch dimension of 1 dropped)."""
    tensor = Tensor(dtype=row.dtype, shape=list(row.shape), data=bytes(row.tensor))
    array = decode_tensor(tensor, field=f"samples[{row.msg_id}].tensor", allow_nonfinite=True)
    return np.asarray(array, dtype=np.float32).reshape(-1)


def probabilities(path: Path, x: NDArray[np.float32]) -> tuple[NDArray[np.float64], tuple[str, ...]]:
    """Class probabilities of the model at `path` for inputs x [N, features], and its labels."""
    model = load_model(path, error=LabelImportError)
    (scores,) = model.session.run(None, {model.signature.input_name: np.ascontiguousarray(x, dtype=np.float32)})[:1]
    kind = model.card.output_kind
    probs = softmax(scores, np.float64) if kind == "logits" else np.asarray(scores, dtype=np.float64)
    return probs, model.card.labels


async def pseudo_label(
    registry: Registry,
    teacher_path: Path,
    teacher_ref: str,
    *,
    min_confidence: float,
    fleet: str | None = None,
    devices: list[str] | None = None,
) -> PseudoStats:
    """Label every matching sample without a human label whose teacher confidence >= min_confidence."""
    if not 0.0 < min_confidence <= 1.0:
        raise LabelImportError(f"--min-confidence {min_confidence} must be in (0, 1]")
    where: list[Any] = [~SampleRow.msg_id.in_(select(LabelRow.msg_id).where(LabelRow.source == HUMAN))]
    if fleet is not None:
        where.append(SampleRow.fleet_id == fleet)
    if devices:
        where.append(SampleRow.device_id.in_(devices))
    async with registry.engine.connect() as conn:
        rows = list(
            await conn.execute(
                select(SampleRow.msg_id, SampleRow.dtype, SampleRow.shape, SampleRow.tensor).where(*where)
            )
        )
    if not rows:
        return PseudoStats(0, 0, 0)
    x = np.stack([row_input(r) for r in rows])
    probs, labels = await asyncio.to_thread(probabilities, teacher_path, x)
    best = np.argmax(probs, axis=1)
    confidence = probs[np.arange(len(rows)), best]
    keep = [i for i in range(len(rows)) if confidence[i] >= min_confidence]
    now = time.time()
    async with registry.engine.begin() as conn:
        old = {
            r.msg_id: r.revision
            for r in await conn.execute(select(LabelRow.msg_id, LabelRow.revision).where(LabelRow.source == PSEUDO))
        }
        fresh: list[dict[str, Any]] = []
        for i in keep:
            msg_id = rows[i].msg_id
            values = {
                "label": labels[int(best[i])],
                "origin": teacher_ref[:256],
                "confidence": float(confidence[i]),
                "import_id": None,
                "updated_at": now,
            }
            if msg_id in old:
                await conn.execute(
                    update(LabelRow)
                    .where(LabelRow.msg_id == msg_id, LabelRow.source == PSEUDO)
                    .values(revision=old[msg_id] + 1, **values)
                )
            else:
                fresh.append({"msg_id": msg_id, "source": PSEUDO, "revision": 1, **values})
        if fresh:
            await conn.execute(insert(LabelRow), fresh)
    return PseudoStats(len(rows), len(keep), len(rows) - len(keep))
