"""The tables of the improvement loop (cloud_bridge/improve, cloud_bridge/samples/labels.py): labels,
label imports, dataset versions, model lineage and the loops themselves.

Kept apart from tables.py (the ingest's tables) and registered on the same `Base`, so
`Registry.create` makes them in every registry, old ones included (`create_all` adds missing tables).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Float, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from cloud_bridge.registry.tables import Base


class LabelRow(Base):
    """The current label of one archived sample from one source: `human` (imported from a labeling tool)
    or `pseudo` (a teacher model above a confidence threshold). Both may exist for a sample; they are
    never merged: a dataset version says which one it took. `revision` grows when an import changes it."""

    __tablename__ = "labels"
    msg_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    source: Mapped[str] = mapped_column(String(16), primary_key=True)
    label: Mapped[str] = mapped_column(String(64))
    # human: the labeling tool's annotation id and who made it; pseudo: the teacher NAME@VERSION.
    origin: Mapped[str] = mapped_column(String(256))
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    import_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[float] = mapped_column(Float)


class LabelImportRow(Base):
    """One label file imported (keyed by its sha256: the same file again changes nothing)."""

    __tablename__ = "label_imports"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the file's bytes
    path: Mapped[str] = mapped_column(String(1024))
    tasks: Mapped[int] = mapped_column(Integer)
    labeled: Mapped[int] = mapped_column(Integer)
    changed: Mapped[int] = mapped_column(Integer)
    imported_at: Mapped[float] = mapped_column(Float)


class DatasetVersionRow(Base):
    """A frozen set of labeled samples: which filter built it and how many of each source and split."""

    __tablename__ = "dataset_versions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    counts: Mapped[dict[str, int]] = mapped_column(JSON)


class DatasetItemRow(Base):
    """One sample of a dataset version, with the label and its source as they were at that moment."""

    __tablename__ = "dataset_items"
    dataset_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    msg_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    label: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))
    split: Mapped[str] = mapped_column(String(16))  # train | holdout


class ModelLineageRow(Base):
    """Where a registered model came from: base model, dataset version, trainer, and its metrics."""

    __tablename__ = "model_lineage"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    base_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    base_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    dataset_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    trainer: Mapped[str] = mapped_column(String(1024))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class ImproveLoopRow(Base):
    """One run of the improvement loop (cloud_bridge/improve/driver.py): its inputs, its phase, what
    each finished phase produced, and the lease of the worker driving it."""

    __tablename__ = "improve_loops"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    fleet_id: Mapped[str] = mapped_column(String(64))
    devices: Mapped[list[str]] = mapped_column(JSON)
    base_name: Mapped[str] = mapped_column(String(64))
    base_version: Mapped[str] = mapped_column(String(64))
    options: Mapped[dict[str, Any]] = mapped_column(JSON)
    phase: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    dataset_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    candidate_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    gate: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    rollout_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class EscalationAdviceRow(Base):
    """Whether escalating helps, per device and edge model version (cloud_bridge/improve/escalation_value.py):
    the last assessment on human labels, and the pause the bridge's escalation replies should carry
    (`escalate_reply/1` `pause_s`; None while escalating helps or too few labels say)."""

    __tablename__ = "escalation_advice"
    fleet_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    verdict: Mapped[str] = mapped_column(String(16))
    labeled: Mapped[int] = mapped_column(Integer)
    edge_accuracy: Mapped[float] = mapped_column(Float)
    cloud_accuracy: Mapped[float] = mapped_column(Float)
    pause_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)
