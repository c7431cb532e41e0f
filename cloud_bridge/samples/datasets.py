"""Dataset versions: a frozen list of labeled samples (which sample, which label, from which source,
train or holdout), built from the `labels` table and kept in `dataset_versions` / `dataset_items`.

The holdout slice takes only human labels (a gate judged on a teacher's guesses would grade the
teacher), chosen by a hash of the msg_id so it never moves when labels are added. Pseudo-labels join
the training split only when asked, only for samples without a human label, and keep source `pseudo`.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import insert, select

from cloud_bridge.errors import BridgeError
from cloud_bridge.registry import DatasetItemRow, DatasetVersionRow, LabelRow, Registry, SampleRow
from cloud_bridge.samples.labels import HUMAN, PSEUDO
from cloud_bridge.samples.pseudo import row_input

TRAIN = "train"
HOLDOUT = "holdout"


class DatasetError(BridgeError, ValueError):
    """A dataset version cannot be built or read: the message says why and what to do."""


@dataclass(frozen=True)
class DatasetSpec:
    fleet: str | None = None
    devices: tuple[str, ...] = ()
    holdout_fraction: float = 0.3
    include_pseudo: bool = False
    min_human: int = 1

    def as_json(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "devices": list(self.devices),
            "holdout_fraction": self.holdout_fraction,
            "include_pseudo": self.include_pseudo,
        }


@dataclass(frozen=True)
class Dataset:
    id: str
    x_train: NDArray[np.float32]
    y_train: list[str]
    sources: list[str]
    x_holdout: NDArray[np.float32]
    y_holdout: list[str]
    counts: dict[str, int]


def in_holdout(msg_id: str, fraction: float) -> bool:
    digest = hashlib.sha256(msg_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


async def create_dataset(registry: Registry, spec: DatasetSpec, dataset_id: str | None = None) -> str:
    """Freeze the labels matching `spec` as a new dataset version (or return `dataset_id` if it exists)."""
    dataset_id = dataset_id or f"ds-{int(time.time())}-{uuid.uuid4().hex[:6]}"
    where: list[Any] = []
    if spec.fleet is not None:
        where.append(SampleRow.fleet_id == spec.fleet)
    if spec.devices:
        where.append(SampleRow.device_id.in_(list(spec.devices)))
    query = select(LabelRow.msg_id, LabelRow.label, LabelRow.source).join(
        SampleRow, SampleRow.msg_id == LabelRow.msg_id
    )
    async with registry.engine.begin() as conn:
        existing = await conn.execute(select(DatasetVersionRow.id).where(DatasetVersionRow.id == dataset_id))
        if existing.scalar() is not None:
            return dataset_id
        rows = list(await conn.execute(query.where(*where)))
        human = {r.msg_id: r.label for r in rows if r.source == HUMAN}
        pseudo = {r.msg_id: r.label for r in rows if r.source == PSEUDO and r.msg_id not in human}
        if len(human) < spec.min_human:
            raise DatasetError(
                f"only {len(human)} human labels match (need {spec.min_human}): import more with "
                "`cloud-bridge samples labels import FILE`"
            )
        items = [
            {
                "dataset_id": dataset_id,
                "msg_id": m,
                "label": lab,
                "source": HUMAN,
                "split": HOLDOUT if in_holdout(m, spec.holdout_fraction) else TRAIN,
            }
            for m, lab in sorted(human.items())
        ]
        if spec.include_pseudo:
            items += [
                {"dataset_id": dataset_id, "msg_id": m, "label": lab, "source": PSEUDO, "split": TRAIN}
                for m, lab in sorted(pseudo.items())
            ]
        counts = {
            "human_train": sum(1 for i in items if i["source"] == HUMAN and i["split"] == TRAIN),
            "human_holdout": sum(1 for i in items if i["split"] == HOLDOUT),
            "pseudo_train": sum(1 for i in items if i["source"] == PSEUDO),
        }
        await conn.execute(
            insert(DatasetVersionRow).values(id=dataset_id, created_at=time.time(), spec=spec.as_json(), counts=counts)
        )
        if items:
            await conn.execute(insert(DatasetItemRow), items)
    return dataset_id


async def dataset_counts(registry: Registry, dataset_id: str) -> dict[str, int] | None:
    """Labels per source and split of a dataset version (None if it does not exist)."""
    async with registry.engine.connect() as conn:
        found = await conn.execute(select(DatasetVersionRow.counts).where(DatasetVersionRow.id == dataset_id))
        counts = found.scalar()
    return None if counts is None else dict(counts)


async def load_dataset(registry: Registry, dataset_id: str) -> Dataset:
    """The inputs and labels of a dataset version, split as frozen."""
    async with registry.engine.connect() as conn:
        version = (
            await conn.execute(select(DatasetVersionRow.counts).where(DatasetVersionRow.id == dataset_id))
        ).first()
        if version is None:
            raise DatasetError(
                f"dataset version {dataset_id} does not exist: list them with `cloud-bridge improve status`"
            )
        rows = list(
            await conn.execute(
                select(
                    DatasetItemRow.msg_id,
                    DatasetItemRow.label,
                    DatasetItemRow.source,
                    DatasetItemRow.split,
                    SampleRow.dtype,
                    SampleRow.shape,
                    SampleRow.tensor,
                )
                .join(SampleRow, SampleRow.msg_id == DatasetItemRow.msg_id)
                .where(DatasetItemRow.dataset_id == dataset_id)
                .order_by(DatasetItemRow.msg_id)
            )
        )
    train = [r for r in rows if r.split == TRAIN]
    hold = [r for r in rows if r.split == HOLDOUT]

    def stack(part: list[Any]) -> NDArray[np.float32]:
        return np.stack([row_input(r) for r in part]) if part else np.zeros((0, 0), dtype=np.float32)

    return Dataset(
        id=dataset_id,
        x_train=stack(train),
        y_train=[r.label for r in train],
        sources=[r.source for r in train],
        x_holdout=stack(hold),
        y_holdout=[r.label for r in hold],
        counts=dict(version.counts),
    )
