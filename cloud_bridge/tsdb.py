"""Telemetry to InfluxDB: line protocol formatted by hand, written in batches with retry and a spill file.

Why by hand: influxdb-client spends its time building `Point` objects (LIMITS.md trap 5); formatting
strings is 6-8x faster. The writer keeps a bounded in-memory buffer; while InfluxDB is down the lines
beyond that bound go to an append-only spill file, which is replayed (oldest first) once writes succeed
again, and everything still buffered at shutdown is spilled too, so a TSDB restart or a bridge restart
loses nothing. A point's timestamp is the telemetry `window_end` (ms), so a replayed message rewrites
the same point instead of adding one.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.write_precision import WritePrecision

from schemas.messages import Alert, Telemetry

log = logging.getLogger(__name__)

_MEASUREMENT_ESC = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\\": "\\\\"})
_TAG_ESC = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\\": "\\\\"})
_STR_ESC = str.maketrans({'"': r"\"", "\\": "\\\\"})

FieldValue = float | int | bool | str


def escape_tag(value: str) -> str:
    """Escape a tag key, tag value or field key (commas, equals signs, spaces, backslashes)."""
    return value.translate(_TAG_ESC)


def format_field(value: FieldValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return repr(value)
    return '"' + value.translate(_STR_ESC) + '"'


def line(measurement: str, tags: dict[str, str], fields: dict[str, FieldValue], ts_ms: int) -> str:
    """One line of InfluxDB line protocol; tags sorted (InfluxDB's preferred order), empty tags skipped."""
    tag_part = "".join(f",{escape_tag(k)}={escape_tag(v)}" for k, v in sorted(tags.items()) if v != "")
    field_part = ",".join(f"{escape_tag(k)}={format_field(v)}" for k, v in fields.items())
    return f"{measurement.translate(_MEASUREMENT_ESC)}{tag_part} {field_part} {ts_ms}"


def telemetry_lines(message: Telemetry) -> list[str]:
    """The points of one telemetry window: inference, class_counts (one per class) and device_status."""
    tags = {
        "fleet": message.fleet_id,
        "device": message.device_id,
        "model": message.model.name,
        "model_version": message.model.version,
    }
    ts_ms = round(message.window_end * 1000)
    fields: dict[str, FieldValue] = {"count": message.count, "rejected": message.rejected}
    if message.latency_ms is not None:
        lat = message.latency_ms
        fields.update(latency_p50=lat.p50, latency_p95=lat.p95, latency_p99=lat.p99, latency_max=lat.max)
    if message.confidence is not None:
        fields.update(confidence_mean=message.confidence.mean, confidence_p05=message.confidence.p05)
    if message.entropy is not None:
        fields["entropy_mean"] = message.entropy.mean
    esc, smp, box = message.escalations, message.samples, message.outbox
    fields.update(
        escalations_sent=esc.sent,
        escalations_answered=esc.answered,
        escalations_timed_out=esc.timed_out,
        escalations_fallback=esc.offline_fallback,
        samples_sent=smp.sent,
        samples_skipped=smp.skipped_budget,
        outbox_depth=box.depth,
        outbox_bytes=box.bytes,
        outbox_evicted=sum(box.evicted.values()),
    )
    if message.resources is not None:
        fields.update(cpu=message.resources.cpu_percent, rss=message.resources.rss_mb)
    if message.providers is not None:
        fields["provider_fallback"] = int(message.providers.fallback)
    out = [line("inference", tags, fields, ts_ms)]
    out.extend(line("class_counts", {**tags, "class": c}, {"count": n}, ts_ms) for c, n in message.class_counts.items())
    out.append(line("device_status", tags, {"online": 1}, ts_ms))
    return out


def status_line(fleet_id: str, device_id: str, online: bool, ts: float, model: str = "", version: str = "") -> str:
    tags = {"fleet": fleet_id, "device": device_id, "model": model, "model_version": version}
    return line("device_status", tags, {"online": int(online)}, round(ts * 1000))


def agreement_line(fleet_id: str, device_id: str, version: str, agreed: int, answered: int, ts: float) -> str:
    tags = {"fleet": fleet_id, "device": device_id, "model_version": version}
    fields: dict[str, FieldValue] = {"agreement": agreed / answered if answered else 0.0, "answered": answered}
    return line("escalation", tags, fields, round(ts * 1000))


def drift_line(
    fleet_id: str,
    device_id: str,
    model: str,
    version: str,
    metric: str,
    score: float,
    threshold: float,
    firing: bool,
    ts: float,
) -> str:
    """One drift evaluation: `metric` is the kind (prediction_drift, ...), at the evaluated window's end."""
    tags = {"fleet": fleet_id, "device": device_id, "model": model, "version": version, "metric": metric}
    fields: dict[str, FieldValue] = {"score": float(score), "threshold": float(threshold), "firing": int(firing)}
    return line("drift", tags, fields, round(ts * 1000))


def alert_line(alert: Alert) -> str:
    """An alert transition, for Grafana annotations (state "firing" or "resolved")."""
    tags = {
        "fleet": alert.fleet_id,
        "device": alert.device_id,
        "model": alert.model.name,
        "version": alert.model.version,
        "kind": alert.kind,
    }
    fields: dict[str, FieldValue] = {
        "state": alert.state,
        "score": float(alert.score),
        "threshold": float(alert.threshold),
        "detail": alert.detail,
    }
    return line("alert", tags, fields, round(alert.window_end * 1000))


@dataclass(frozen=True)
class TsdbSettings:
    url: str
    org: str
    bucket: str
    token: str
    spill_path: Path
    batch_lines: int = 5000
    flush_interval_s: float = 0.5
    buffer_max_lines: int = 100_000
    retry_max_s: float = 10.0


class TsdbWriter:
    """Buffers lines and writes them to InfluxDB's v2 write API in batches from a worker thread."""

    def __init__(self, settings: TsdbSettings) -> None:
        self._s = settings
        self._client = InfluxDBClient(url=settings.url, token=settings.token, org=settings.org, timeout=10_000)
        self._api = self._client.write_api(write_options=SYNCHRONOUS)
        self._buffer: deque[str] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self.written = 0
        self.failures = 0
        self.spilled = 0

    @property
    def pending(self) -> int:
        return len(self._buffer) + self._spilled_lines()

    def add(self, lines: Iterable[str]) -> None:
        """Accept lines for writing; past the memory bound they go to the spill file right away."""
        self._buffer.extend(lines)
        overflow = len(self._buffer) - self._s.buffer_max_lines
        if overflow > 0:
            self._spill([self._buffer.popleft() for _ in range(overflow)])
        self._idle.clear()
        self._wake.set()

    def _spill(self, lines: list[str]) -> None:
        with self._s.spill_path.open("a", encoding="utf-8") as fh:
            fh.write("".join(f"{ln}\n" for ln in lines))
            fh.flush()
            os.fsync(fh.fileno())
        self.spilled += len(lines)
        log.warning("tsdb spilled lines=%d path=%s", len(lines), self._s.spill_path)

    def _spilled_lines(self) -> int:
        path = self._s.spill_path
        if not path.exists():
            return 0
        with path.open("rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 16), b""))

    async def run(self) -> None:
        """Write until `close()`; on close, what could not be written is spilled for the next start."""
        delay = self._s.flush_interval_s
        while True:
            if not self._buffer and not self._s.spill_path.exists():
                self._idle.set()
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            ok = await self._write_some()
            if ok:
                delay = self._s.flush_interval_s
                continue
            if self._closing:
                self._spill(list(self._buffer))
                self._buffer.clear()
                self._idle.set()
                return
            await self._wait_or_close(delay)
            delay = min(delay * 2, self._s.retry_max_s)

    async def _wait_or_close(self, delay: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except TimeoutError:
            return

    async def _write_some(self) -> bool:
        # Spilled lines are older: replay them first so points arrive roughly in order.
        if self._s.spill_path.exists():
            return await self._replay_spill()
        batch = [self._buffer[i] for i in range(min(len(self._buffer), self._s.batch_lines))]
        if not await self._send(batch):
            return False
        for _ in batch:
            self._buffer.popleft()
        return True

    async def _replay_spill(self) -> bool:
        path = self._s.spill_path
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln]
        for start in range(0, len(lines), self._s.batch_lines):
            if not await self._send(lines[start : start + self._s.batch_lines]):
                # Keep what is left; rewrite so already-sent chunks are not resent.
                rest = lines[start:]
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(f"{ln}\n" for ln in rest), encoding="utf-8")
                tmp.replace(path)
                return False
        path.unlink()
        log.info("tsdb spill replayed lines=%d", len(lines))
        return True

    async def _send(self, batch: list[str]) -> bool:
        # Any failure (connection refused, HTTP 5xx, timeout) means "keep the lines and retry later".
        try:
            body = "\n".join(batch)
            # WritePrecision's members are plain str constants, though the signature names the class.
            precision: WritePrecision = WritePrecision.MS  # type: ignore[assignment]
            await asyncio.to_thread(
                self._api.write, bucket=self._s.bucket, org=self._s.org, record=body, write_precision=precision
            )
        except Exception as exc:
            self.failures += 1
            log.warning("tsdb write failed lines=%d error=%s", len(batch), str(exc).splitlines()[0][:200])
            return False
        self.written += len(batch)
        return True

    async def flush(self, deadline_s: float) -> bool:
        """Wait until everything accepted so far is written (or spilled at close); False on timeout."""
        self._wake.set()
        try:
            await asyncio.wait_for(self._idle.wait(), deadline_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self._closing = True
        self._wake.set()

    def dispose(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]
