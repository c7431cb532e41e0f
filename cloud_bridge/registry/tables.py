"""The registry's tables, declared with the SQLAlchemy ORM (one class per table).

The hot path never builds ORM objects from these (cloud_bridge/registry/registry.py writes with Core
bulk statements); they declare the schema that `Registry.create` makes, and name the tables and
columns in queries.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Device(Base):
    __tablename__ = "devices"
    fleet_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[float] = mapped_column(Float, default=0.0)
    model_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    messages: Mapped[int] = mapped_column(BigInteger, default=0)
    telemetry_windows: Mapped[int] = mapped_column(BigInteger, default=0)
    samples: Mapped[int] = mapped_column(BigInteger, default=0)
    results: Mapped[int] = mapped_column(BigInteger, default=0)
    # Status.order of the status that set `online` (None: none of the device's carried one yet).
    status_order: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class SeenMessage(Base):
    __tablename__ = "seen_messages"
    msg_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    received_at: Mapped[float] = mapped_column(Float, index=True)


class DeadLetter(Base):
    __tablename__ = "dead_letters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(1024))
    reason: Mapped[str] = mapped_column(String(2048))
    field: Mapped[str] = mapped_column(String(256))
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    raw_size: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[float] = mapped_column(Float)


class SampleRow(Base):
    __tablename__ = "samples"
    msg_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    fleet_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    inference_id: Mapped[str] = mapped_column(String(128))
    dtype: Mapped[str] = mapped_column(String(16))
    shape: Mapped[list[int]] = mapped_column(JSON)
    tensor: Mapped[bytes] = mapped_column(LargeBinary)
    topk: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    entropy: Mapped[float] = mapped_column(Float)
    margin: Mapped[float] = mapped_column(Float)
    reasons: Mapped[list[str]] = mapped_column(JSON)
    predicted: Mapped[str] = mapped_column(String(64))
    truth: Mapped[str | None] = mapped_column(String(64), nullable=True)
    ts: Mapped[float] = mapped_column(Float)
    # For labelers' exports (cloud_bridge/samples/export.py): which exact model answered, where the input
    # came from, and when the bridge archived it (the export cursor and the archive's age bound use
    # arrival time, so a device that was offline for hours is not skipped).
    model_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    source_ref: Mapped[str | None] = mapped_column(String(256), nullable=True)
    received_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)


class ResultRow(Base):
    """One final answer; a result/2 message carries many, so the key is the message and the place."""

    __tablename__ = "results"
    msg_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    fleet_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    inference_id: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(16))
    confidence: Mapped[float] = mapped_column(Float)
    truth: Mapped[str | None] = mapped_column(String(64), nullable=True)
    ts: Mapped[float] = mapped_column(Float)


class ResultAggregate(Base):
    """What the result rows of one (device, edge model version, path) said over one time bucket, kept
    after the rows themselves pass `[registry] results_retention_s` (cloud_bridge/registry/retention.py)."""

    __tablename__ = "result_aggregates"
    fleet_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(String(16), primary_key=True)
    bucket_start: Mapped[float] = mapped_column(Float, primary_key=True)  # unix s, a multiple of bucket_s
    bucket_s: Mapped[float] = mapped_column(Float)
    answers: Mapped[int] = mapped_column(BigInteger, default=0)
    confidence_sum: Mapped[float] = mapped_column(Float, default=0.0)
    with_truth: Mapped[int] = mapped_column(BigInteger, default=0)  # answers whose input had a known label
    correct: Mapped[int] = mapped_column(BigInteger, default=0)  # ... and the answer was that label


class TelemetryRow(Base):
    __tablename__ = "telemetry"
    # What the fleet-wide queries (cloud_bridge/registry/telemetry_stats.py) read of a window, by
    # window_end: with the summary columns in the index, SQLite answers them from the index alone (a
    # row is ~3 KB with its body: reading 600,000 of them was most of a 10,000-device query), and
    # PostgreSQL can once a page is all-visible.
    __table_args__ = (
        Index(
            "ix_telemetry_stats",
            "window_end",
            "fleet_id",
            "device_id",
            "model_name",
            "model_version",
            "window_start",
            "count",
            "rejected",
            "escalations_sent",
            "escalations_answered",
            "escalations_agreed",
            "confidence_mean",
            "latency_p95_ms",
            "outbox_depth",
        ),
    )
    msg_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    fleet_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    window_start: Mapped[float] = mapped_column(Float)
    window_end: Mapped[float] = mapped_column(Float)  # indexed first in ix_telemetry_stats
    count: Mapped[int] = mapped_column(Integer)
    # The numbers fleet-wide queries sum in SQL (the rollout judge, `cloud-bridge devices`:
    # cloud_bridge/registry/telemetry_stats.py), filled for every window (cloud_bridge/ingest/rows.py
    # telemetry_columns). NULL in rows stored before they existed: those queries read such rows'
    # `summary`, or their `body` when older still. Declared before `body` so that SQLite finds them
    # without reading past the ~3 KB body (columns added to an older registry come after it).
    rejected: Mapped[int | None] = mapped_column(Integer, nullable=True)
    escalations_sent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    escalations_answered: Mapped[int | None] = mapped_column(Integer, nullable=True)
    escalations_agreed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    confidence_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float, nullable=True)  # edge_latency_ms, else latency_ms
    outbox_depth: Mapped[int | None] = mapped_column(Integer, nullable=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The few fields fleet-wide queries read (cloud_bridge/ingest/rows.py telemetry_summary) in the
    # release before the columns above. Still written, for bridges of that release sharing the registry
    # during a rolling upgrade; this release reads it only where the columns are NULL. None: older rows.
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class CommandAckRow(Base):
    __tablename__ = "command_acks"
    msg_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    fleet_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(String(64))
    cmd_id: Mapped[str] = mapped_column(String(36), index=True)
    state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    ts: Mapped[float] = mapped_column(Float)


class AlertRow(Base):
    __tablename__ = "alerts"
    msg_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    fleet_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(String(64))
    alert_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    model_version: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    detail: Mapped[str] = mapped_column(String(1024))
    ts: Mapped[float] = mapped_column(Float)


class Agreement(Base):
    __tablename__ = "escalation_agreement"
    fleet_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    answered: Mapped[int] = mapped_column(BigInteger, default=0)
    agreed: Mapped[int] = mapped_column(BigInteger, default=0)


class ModelRow(Base):
    """A registered model artifact (cloud_bridge/models/store.py); the bytes live at `path`, named by sha256."""

    __tablename__ = "models"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(String(1024))
    labels: Mapped[list[str]] = mapped_column(JSON)
    input_shape: Mapped[list[int]] = mapped_column(JSON)
    reference_mix: Mapped[dict[str, float]] = mapped_column(JSON)
    added_at: Mapped[float] = mapped_column(Float)


class CommandRow(Base):
    """A signed command the cloud sent (cloud_bridge/ota/commands.py); join with command_acks on cmd_id."""

    __tablename__ = "commands"
    cmd_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    fleet_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(32))
    model_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    rollout_id: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    stage: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sent_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)


class RolloutRow(Base):
    """A canary rollout (cloud_bridge/rollout/driver.py); `owner`/`lease_until` let one bridge drive it at a time."""

    __tablename__ = "rollouts"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    fleet_id: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    model_sha256: Mapped[str] = mapped_column(String(64))
    stages: Mapped[list[int]] = mapped_column(JSON)
    stage: Mapped[int] = mapped_column(Integer, default=0)
    phase: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    thresholds: Mapped[dict[str, dict[str, float]]] = mapped_column(JSON)
    window_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    stage_started_at: Mapped[float] = mapped_column(Float)
    watch_from: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)
    rollback_pending: Mapped[bool] = mapped_column(Boolean, default=False)
    last_eval: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Which telemetry the canary is judged against (cloud_bridge/rollout/store.py CONTROLS); NULL: "fleet".
    control: Mapped[str | None] = mapped_column(String(16), nullable=True)


class RolloutDeviceRow(Base):
    """One device of a rollout: the stage that took it, what it ran before, its update and rollback."""

    __tablename__ = "rollout_devices"
    rollout_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    fleet_id: Mapped[str] = mapped_column(String(64))
    stage: Mapped[int] = mapped_column(Integer)
    previous_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    previous_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    previous_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cmd_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    rollback_cmd_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)


class DriftStateRow(Base):
    """All drift state of one (device, model version) in one row (cloud_bridge/drift/store.py): the
    baseline, the windows it is scored on, and each kind's hysteresis. It is also the row an evaluation
    locks, so one row read and one row write per device and batch."""

    __tablename__ = "drift_states"
    fleet_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_sha256: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))
    class_mix: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)
    class_samples: Mapped[int] = mapped_column(Integer, default=0)
    # JSON text of the pooled baseline in rows made before drift_baselines (moved there when next saved).
    baseline: Mapped[str | None] = mapped_column(Text, nullable=True)
    # JSON text of the windows: every one so far until the baseline is frozen, then the newest few.
    windows: Mapped[str] = mapped_column(Text, default="[]")
    kinds: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    last_window_end: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    # A random token written with every change: a bridge whose cached state carries the same token
    # need not read the row's windows again (cloud_bridge/drift/state.py). None: never written so.
    version: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class DriftWindowRow(Base):
    """One telemetry window a drift state is scored on, written once when it arrives and deleted once
    it leaves the recent pool (rows made before this table kept them in `drift_states.windows`)."""

    __tablename__ = "drift_windows"
    fleet_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    window_end: Mapped[float] = mapped_column(Float, primary_key=True)
    msg_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    window_start: Mapped[float] = mapped_column(Float)
    count: Mapped[int] = mapped_column(Integer)
    stats: Mapped[bytes] = mapped_column(LargeBinary)  # cloud_bridge/drift/codec.py pack_window


class DriftBaselineRow(Base):
    """The frozen baseline of one (device, model version): pooled statistics of its first windows as
    JSON text (cloud_bridge/drift/codec.py pool_to_json), written once when it freezes. Out of
    `drift_states`, whose row is rewritten with every scored window: ~1.6 KB of baseline made it a
    page of its own. Rows made before this table keep it in `drift_states.baseline` until moved."""

    __tablename__ = "drift_baselines"
    fleet_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    baseline: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class DriftEpisodeRow(Base):
    """One alert transition; the primary key is the dedup key: one firing and one resolved per episode."""

    __tablename__ = "drift_episodes"
    fleet_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    episode: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    alert_msg_id: Mapped[str] = mapped_column(String(36), unique=True)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    published: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    created_at: Mapped[float] = mapped_column(Float)
