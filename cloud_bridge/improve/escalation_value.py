"""Does escalating help? Per device and edge model version, on human-labeled samples: the edge model's
answer (the sample's `predicted`) against the cloud model's answer on the same input, both scored
against the human label.

Archived samples are the inputs the edge was unsure of, the same kind it escalates, so these are the
accuracies of "answer locally" and "ask the cloud" where the choice is made. The verdict per row:
`helps` when the cloud is at least `min_gain` better on at least `min_samples` labels, `does_not_help`
when it is not better, `unknown` with too few labels.

`record_advice` keeps the verdicts in `escalation_advice` with the pause a `does_not_help` row earns;
`EscalationAdvice` is the in-memory view an escalation responder reads per request (`pause_for`, a
dict lookup) and refreshes now and then, to put into its reply's `pause_s` (escalate_reply/1: the device
then keeps its local answers for that long, and asks again after it).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import delete, insert, select

from cloud_bridge.registry import EscalationAdviceRow, LabelRow, Registry, SampleRow
from cloud_bridge.samples.labels import HUMAN
from cloud_bridge.samples.pseudo import probabilities, row_input


@dataclass(frozen=True)
class EscalationValue:
    fleet_id: str
    device_id: str
    model_version: str
    labeled: int
    edge_accuracy: float
    cloud_accuracy: float
    verdict: str  # helps | does_not_help | unknown


async def assess(
    registry: Registry, cloud_model: Path, *, min_samples: int = 30, min_gain: float = 0.0
) -> list[EscalationValue]:
    query = (
        select(
            SampleRow.msg_id,
            SampleRow.fleet_id,
            SampleRow.device_id,
            SampleRow.model_version,
            SampleRow.predicted,
            SampleRow.dtype,
            SampleRow.shape,
            SampleRow.tensor,
            LabelRow.label,
        )
        .join(LabelRow, LabelRow.msg_id == SampleRow.msg_id)
        .where(LabelRow.source == HUMAN)
    )
    async with registry.engine.connect() as conn:
        rows = list(await conn.execute(query))
    if not rows:
        return []
    probs, labels = await asyncio.to_thread(probabilities, cloud_model, np.stack([row_input(r) for r in rows]))
    cloud = [labels[int(i)] for i in np.argmax(probs, axis=1)]
    groups: dict[tuple[str, str, str], list[tuple[bool, bool]]] = {}
    for row, answer in zip(rows, cloud, strict=True):
        key = (row.fleet_id, row.device_id, row.model_version)
        groups.setdefault(key, []).append((row.predicted == row.label, answer == row.label))
    out = []
    for (fleet, device, version), hits in sorted(groups.items()):
        edge = sum(e for e, _ in hits) / len(hits)
        cloud_acc = sum(c for _, c in hits) / len(hits)
        if len(hits) < min_samples:
            verdict = "unknown"
        elif cloud_acc - edge >= max(min_gain, 1e-12):
            verdict = "helps"
        else:
            verdict = "does_not_help"
        out.append(EscalationValue(fleet, device, version, len(hits), edge, cloud_acc, verdict))
    return out


def value_on_holdout(
    candidate: Path,
    cloud_model: Path,
    x: np.ndarray,
    labels: list[str],
    *,
    below: float,
    min_samples: int,
    min_gain: float,
) -> tuple[int, float, float, str, str]:
    """Would the cloud help a candidate model? On a loop's human-labeled holdout (drifted inputs the
    candidate never trained on): its accuracy and the cloud model's, on the inputs the candidate is
    unsure of (top-1 under `below`, the ones a device would escalate) when there are `min_samples` of
    them, else on the whole holdout. Returns (labeled, edge accuracy, cloud accuracy, verdict, slice)."""
    edge_probs, edge_labels = probabilities(candidate, x)
    cloud_probs, cloud_labels = probabilities(cloud_model, x)
    unsure = edge_probs.max(axis=1) < below
    where = "unsure" if int(unsure.sum()) >= min_samples else "all"
    keep = unsure if where == "unsure" else np.ones(len(labels), dtype=bool)
    truth = np.asarray(labels, dtype=object)[keep]
    edge_answers = np.asarray(edge_labels, dtype=object)[edge_probs[keep].argmax(axis=1)]
    cloud_answers = np.asarray(cloud_labels, dtype=object)[cloud_probs[keep].argmax(axis=1)]
    n = int(keep.sum())
    if n == 0:
        return 0, 0.0, 0.0, "unknown", where
    edge_acc, cloud_acc = float(np.mean(edge_answers == truth)), float(np.mean(cloud_answers == truth))
    verdict = "helps" if cloud_acc - edge_acc >= max(min_gain, 1e-12) else "does_not_help"
    return n, edge_acc, cloud_acc, verdict, where


async def record_advice(registry: Registry, values: list[EscalationValue], pause_s: float) -> int:
    """Store these verdicts, replacing the advice for the same (fleet, device, model version) and
    leaving the rest (an improvement loop's advice for a version nobody labeled yet stays); returns
    how many rows say pause."""
    now = time.time()
    rows = [
        {
            "fleet_id": v.fleet_id,
            "device_id": v.device_id,
            "model_version": v.model_version,
            "verdict": v.verdict,
            "labeled": v.labeled,
            "edge_accuracy": v.edge_accuracy,
            "cloud_accuracy": v.cloud_accuracy,
            "pause_s": pause_s if v.verdict == "does_not_help" else None,
            "updated_at": now,
        }
        for v in values
    ]
    t = EscalationAdviceRow
    async with registry.engine.begin() as conn:
        for v in values:
            await conn.execute(
                delete(t).where(
                    t.fleet_id == v.fleet_id, t.device_id == v.device_id, t.model_version == v.model_version
                )
            )
        if rows:
            await conn.execute(insert(EscalationAdviceRow), rows)
    return sum(1 for r in rows if r["pause_s"] is not None)


class EscalationAdvice:
    """The stored advice in memory: `pause_for` is what a reply to this device should carry."""

    def __init__(self) -> None:
        self._pauses: dict[tuple[str, str, str], float] = {}

    async def refresh(self, registry: Registry) -> None:
        t = EscalationAdviceRow
        async with registry.engine.connect() as conn:
            rows = await conn.execute(
                select(t.fleet_id, t.device_id, t.model_version, t.pause_s).where(t.pause_s.is_not(None))
            )
            self._pauses = {(r.fleet_id, r.device_id, r.model_version): float(r.pause_s) for r in rows}

    def pause_for(self, fleet_id: str, device_id: str, model_version: str) -> float | None:
        return self._pauses.get((fleet_id, device_id, model_version))
