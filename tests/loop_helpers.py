"""The improvement loop's test setup: a registry with the demo models registered and a drifted device's
uncertain samples archived through the ingest's own row builder (cloud_bridge/ingest/rows.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from cloud_bridge.ingest.rows import add_message
from cloud_bridge.models.store import ModelRecord, ModelStore
from cloud_bridge.registry import Batch, Registry
from cloud_bridge.samples.pseudo import probabilities
from schemas import ModelRef, Sample, TopK, encode_tensor, new_msg_id

FLEET = "f1"


async def archive_samples(
    registry: Registry,
    model: ModelRecord,
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    device: str,
    *,
    fleet: str = FLEET,
) -> dict[str, str]:
    """Archive every row of x as one sample of `device` answered by `model`; returns msg_id -> truth."""
    probs, labels = probabilities(model.path, x)
    batch, lines, truth = Batch(), [], {}
    now = time.time()
    ref = ModelRef(name=model.name, version=model.version, sha256=model.sha256)
    for i in range(len(x)):
        order = np.argsort(-probs[i])
        top = [TopK(label=labels[int(k)], index=int(k), prob=float(probs[i, k])) for k in order[:3]]
        entropy = float(-(probs[i] * np.log(np.clip(probs[i], 1e-12, 1))).sum())
        message = Sample(
            msg_id=new_msg_id(),
            fleet_id=fleet,
            device_id=device,
            ts=now,
            model=ref,
            inference_id=f"{device}-{i}",
            input=encode_tensor(np.asarray(x[i], dtype=np.float32)),
            predicted=top[0].label,
            topk=top,
            entropy=entropy,
            margin=top[0].prob - top[1].prob,
            reasons=["margin"],
            source_ref=f"test:{i}",
            truth=None,
        )
        add_message(batch, lines, message, now)
        truth[message.msg_id] = labels[int(y[i])]
    await registry.commit_batch(batch)
    return truth


async def registered(store: ModelStore, path: Path) -> ModelRecord:
    return await store.add(path)
