"""[registry], [influx] and [samples]: where the bridge keeps what it ingests, and for how long."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RegistryConfig:
    url: str = ""  # default: SQLite in state_dir; postgresql+asyncpg://... for several bridges
    # Result rows (one per answer) older than this are folded into result_aggregates (one row per
    # device, model version, path and bucket) and deleted, at the bridge's hourly prune; 0 = keep all.
    results_retention_s: float = 86400.0
    results_bucket_s: float = 300.0
    # Telemetry rows (one per device per window: 8,640 per device-day at 10 s, ~0.7 KB each) whose
    # window ended longer ago than this are deleted at the hourly prune; 0 = keep all. Series for
    # dashboards live in the TSDB; the registry keeps what rollouts, shadows and `devices` read, all of
    # it recent. Drift keeps its own windows (drift_windows).
    telemetry_retention_s: float = 7 * 86400.0

    def validate(self) -> None:
        for name in ("results_retention_s", "telemetry_retention_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 0 (0 keeps every row)")
        if self.results_bucket_s <= 0 or 86400.0 % self.results_bucket_s:
            raise ValueError(f"results_bucket_s = {self.results_bucket_s} must be > 0 and divide a day (60, 300, 3600)")
        if self.url and not self.url.split(":", 1)[0].startswith(("sqlite", "postgresql")):
            raise ValueError(f"url = {self.url!r}: use sqlite+aiosqlite:///PATH or postgresql+asyncpg://...")


@dataclass(frozen=True)
class InfluxConfig:
    url: str | None = None
    # "v2": /api/v2/write with org, bucket, token (InfluxDB 2.x, 3.x, 1.8+); "v1": /write with database,
    # retention_policy, username/password or token (InfluxDB 1.x; 2.x through a DBRP mapping; 3.x).
    api: Literal["v1", "v2"] = "v2"
    org: str = "edgefleet"
    bucket: str = "edgefleet"
    token: str = ""
    database: str = "edgefleet"
    retention_policy: str = ""  # "": the database's default
    username: str | None = None
    password: str | None = None
    batch_lines: int = 5000
    flush_interval_s: float = 0.5
    buffer_max_lines: int = 100_000
    retry_max_s: float = 10.0
    spill_max_bytes: int = 256 * 1024 * 1024  # state_dir/tsdb-spill; past it the oldest lines are dropped

    def validate(self) -> None:
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url = {self.url!r} must start with http:// or https://")
        if self.spill_max_bytes <= 0:
            raise ValueError(f"spill_max_bytes = {self.spill_max_bytes} must be greater than 0")
        for name in ("batch_lines", "buffer_max_lines"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be greater than 0")


@dataclass(frozen=True)
class SamplesConfig:
    """The archive of uncertain samples for labelers (cloud_bridge/samples/archive.py), pruned hourly."""

    max_rows: int = 1_000_000  # oldest-archived rows beyond this are deleted; 0 = no row bound
    max_age_days: float = 90.0  # rows archived longer ago are deleted; 0 = no age bound

    def validate(self) -> None:
        if self.max_rows < 0 or self.max_age_days < 0:
            raise ValueError("max_rows and max_age_days must be >= 0 (0 turns that bound off)")
