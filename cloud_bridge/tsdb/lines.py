"""Telemetry to InfluxDB: line protocol formatted by hand, written in batches with retry and a spill file.

Why by hand: influxdb-client spends its time building `Point` objects (docs/traps.md #5); formatting
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
import re
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
# Ids and model names almost never need escaping: one regex scan is ~3x cheaper than translate.
_TAG_SPECIAL = re.compile(r"[,= \n\\]").search

FieldValue = float | int | bool | str


def escape_tag(value: str) -> str:
    """Escape a tag key, tag value or field key (commas, equals signs, spaces, backslashes)."""
    return value if _TAG_SPECIAL(value) is None else value.translate(_TAG_ESC)


def format_field(value: FieldValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return repr(value)
    return '"' + value.translate(_STR_ESC) + '"'


def tag_part(tags: dict[str, str]) -> str:
    """`,k=v` for every non-empty tag, sorted by key (InfluxDB's preferred order), escaped."""
    return "".join(f",{escape_tag(k)}={escape_tag(v)}" for k, v in sorted(tags.items()) if v != "")


def line(measurement: str, tags: dict[str, str], fields: dict[str, FieldValue], ts_ms: int) -> str:
    """One line of InfluxDB line protocol; tags sorted (InfluxDB's preferred order), empty tags skipped."""
    field_part = ",".join(f"{escape_tag(k)}={format_field(v)}" for k, v in fields.items())
    return f"{measurement.translate(_MEASUREMENT_ESC)}{tag_part(tags)} {field_part} {ts_ms}"


def telemetry_lines(message: Telemetry) -> list[str]:
    """The points of one telemetry window: inference, class_counts (one per class) and device_status.

    The hot path of ingestion (a dozen lines per window): the tags are escaped and sorted once per
    message and the field keys are constant identifiers, so only values are formatted here.
    """
    tags = tag_part(
        {
            "fleet": message.fleet_id,
            "device": message.device_id,
            "model": message.model.name,
            "model_version": message.model.version,
        }
    )
    ts = f" {round(message.window_end * 1000)}"
    fields: list[str] = [f"count={format_field(message.count)}", f"rejected={format_field(message.rejected)}"]
    for prefix, lat in (("latency", message.latency_ms), ("edge_latency", message.edge_latency_ms)):
        if lat is not None:
            fields += [
                f"{prefix}_p50={format_field(lat.p50)}",
                f"{prefix}_p95={format_field(lat.p95)}",
                f"{prefix}_p99={format_field(lat.p99)}",
                f"{prefix}_max={format_field(lat.max)}",
            ]
    if message.confidence is not None:
        conf = message.confidence
        fields += [f"confidence_mean={format_field(conf.mean)}", f"confidence_p05={format_field(conf.p05)}"]
    if message.entropy is not None:
        fields.append(f"entropy_mean={format_field(message.entropy.mean)}")
    esc, smp, box = message.escalations, message.samples, message.outbox
    fields += [
        f"escalations_sent={format_field(esc.sent)}",
        f"escalations_answered={format_field(esc.answered)}",
        f"escalations_timed_out={format_field(esc.timed_out)}",
        f"escalations_fallback={format_field(esc.offline_fallback)}",
        f"samples_sent={format_field(smp.sent)}",
        f"samples_skipped={format_field(smp.skipped_budget)}",
        f"outbox_depth={format_field(box.depth)}",
        f"outbox_bytes={format_field(box.bytes)}",
        f"outbox_evicted={format_field(sum(box.evicted.values()))}",
    ]
    if message.resources is not None:
        fields += [
            f"cpu={format_field(message.resources.cpu_percent)}",
            f"rss={format_field(message.resources.rss_mb)}",
        ]
    if message.providers is not None:
        fields.append(f"provider_fallback={format_field(int(message.providers.fallback))}")
    out = [f"inference{tags} {','.join(fields)}{ts}"]
    # "class" sorts before every other tag key, so it goes first.
    out.extend(
        f"class_counts{_class_tag(c)}{tags} count={format_field(n)}{ts}" for c, n in message.class_counts.items()
    )
    out.append(f"device_status{tags} online=1i{ts}")
    return out


def _class_tag(label: str) -> str:
    return f",class={escape_tag(label)}" if label else ""


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
    return drift_line_for(drift_tags(fleet_id, device_id, model, version), metric, score, threshold, firing, ts)


def drift_tags(fleet_id: str, device_id: str, model: str, version: str) -> tuple[str, str]:
    """The escaped tags of one (device, model version)'s drift lines, before and after `metric`
    (which sorts between them): every evaluation writes one line per kind with the same tags."""
    return tag_part({"fleet": fleet_id, "device": device_id}), tag_part({"model": model, "version": version})


def drift_line_for(tags: tuple[str, str], metric: str, score: float, threshold: float, firing: bool, ts: float) -> str:
    """`drift_line` with the tags from `drift_tags` (same output as `line`)."""
    head, tail = tags
    metric_tag = f",metric={escape_tag(metric)}" if metric else ""
    fields = f"score={float(score)!r},threshold={float(threshold)!r},firing={int(firing)}i"
    return f"drift{head}{metric_tag}{tail} {fields} {round(ts * 1000)}"


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
