"""What one device message writes: its registry row (per message type), its device's counters in the
batch, and its TSDB lines; and the dead-letter row of a payload that failed to decode.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cloud_bridge.mqtt import Incoming
from cloud_bridge.registry import AlertRow, Batch, CommandAckRow, SampleRow, TelemetryRow
from cloud_bridge.tsdb.lines import status_line, telemetry_lines
from schemas.codec import to_builtins
from schemas.errors import DecodeError
from schemas.messages import Alert, CommandAck, Envelope, Result, Results, Sample, Status, Telemetry

log = logging.getLogger(__name__)


def add_message(batch: Batch, lines: list[str] | None, message: Envelope, received_at: float) -> None:
    """Add what `message` writes to `batch` (its row, its device's counters) and its TSDB lines to
    `lines` (None: the bridge writes no series, and formatting them would cost a tenth of its time)."""
    delta = batch.device(message.fleet_id, message.device_id)
    delta.messages += 1
    delta.last_seen = max(delta.last_seen, message.ts)
    base = {"msg_id": message.msg_id, "fleet_id": message.fleet_id, "device_id": message.device_id}
    if isinstance(message, Telemetry):
        delta.telemetry_windows += 1
        delta.model = (message.model.name, message.model.version, message.model.sha256)
        # Not `delta.online = True`: status messages alone move a known device's online state.
        # Telemetry can be dealt to another bridge and committed after this device's last will,
        # and would flip it back online (DeviceDelta.online).
        batch.add_row(TelemetryRow, telemetry_row(base, message, batch.features))
        if lines is not None:
            lines.extend(telemetry_lines(message))
    elif isinstance(message, Status):
        online = message.state == "online"
        order, before = message.order, delta.status_order
        # Within a batch too, a status older (lower order) than one already taken is history:
        # the time series gets it, the device row does not (Registry orders across batches).
        if order is None or before is None or order >= before:
            delta.online = online
            if order is not None:  # >= before, by the condition above
                delta.status_order = order
            if message.model is not None:
                delta.model = (message.model.name, message.model.version, message.model.sha256)
        model, version = ("", "") if message.model is None else (message.model.name, message.model.version)
        # Stamped when the bridge took it, not with the status's ts: a last will's ts is when the
        # device prepared it, at CONNECT, before that connection's birth and telemetry, so
        # Grafana's "last status" of a dead device would be online. One clock (the bridge's)
        # for births and wills keeps a takeover's will before the next birth whatever the
        # device's clock says; status messages reach every bridge in the broker's order.
        if lines is not None:
            lines.append(status_line(message.fleet_id, message.device_id, online, received_at, model, version))
    elif isinstance(message, Sample):
        delta.samples += 1
        batch.add_row(SampleRow, _sample_row(base, message))
    elif isinstance(message, Results):
        delta.results += len(message.answers)
        m, f, d, v, ts = message.msg_id, message.fleet_id, message.device_id, message.model.version, message.ts
        # Tuples in RESULT_COLUMNS order (Batch.results): msg_id, seq, fleet, device, inference_id,
        # model_version, label, path, confidence, truth, ts.
        batch.results.extend(
            (m, seq, f, d, a.inference_id, v, a.label, a.path, a.confidence, a.truth, ts)
            for seq, a in enumerate(message.answers)
        )
    elif isinstance(message, Result):  # result/1, from devices on older software
        delta.results += 1
        r = message
        m, f, d, v = r.msg_id, r.fleet_id, r.device_id, r.model.version
        batch.results.append((m, 0, f, d, r.inference_id, v, r.label, r.path, r.confidence, r.truth, r.ts))
    elif isinstance(message, CommandAck):
        batch.add_row(
            CommandAckRow,
            {**base, "cmd_id": message.cmd_id, "state": message.state, "reason": message.reason, "ts": message.ts},
        )
    elif isinstance(message, Alert):
        batch.add_row(AlertRow, _alert_row(base, message))


def shift_times(message: Envelope, by: float) -> None:
    """Move a message's device times by `by` seconds (a window keeps its length)."""
    message.ts += by
    if isinstance(message, Telemetry):
        message.window_start += by
        message.window_end += by


def dead_letter_row(incoming: Incoming, exc: DecodeError, now: float, limit: int) -> dict[str, object]:
    """The dead_letters row of a payload that failed to decode; the first `limit` bytes are kept."""
    log.info("dead letter topic=%s field=%s reason=%s", incoming.topic, exc.field, exc.reason[:200])
    return {
        "topic": incoming.topic[:1024],
        "reason": exc.reason[:2048],
        "field": exc.field[:256],
        "raw": bytes(incoming.payload[:limit]),
        "raw_size": len(incoming.payload),
        "received_at": now,
    }


def telemetry_row(base: dict[str, str], m: Telemetry, features: dict[str, dict[str, Any]]) -> dict[str, object]:
    """The registry row of a telemetry window; `base` holds its msg_id, fleet_id and device_id. The
    window's feature statistics go to `features` (Batch.features) instead of the row's body."""
    body: dict[str, Any] = to_builtins(m)
    feats = body.pop("features", None)
    if feats is not None:
        features[m.msg_id] = feats
    return {
        **base,
        "model_name": m.model.name,
        "model_version": m.model.version,
        "window_start": m.window_start,
        "window_end": m.window_end,
        "count": m.count,
        "body": body,
        "summary": telemetry_summary(body),
        **telemetry_columns(m),
    }


def telemetry_columns(m: Telemetry) -> dict[str, object]:
    """The numbers of a window that fleet-wide queries sum in SQL (TelemetryRow's summary columns)."""
    latency = m.edge_latency_ms or m.latency_ms  # the device's own speed where it sends it (own_latency)
    return {
        "rejected": m.rejected,
        "escalations_sent": m.escalations.sent,
        "escalations_answered": m.escalations.answered,
        "escalations_agreed": m.escalations.agreed,
        "confidence_mean": None if m.confidence is None else m.confidence.mean,
        "latency_p95_ms": None if latency is None else latency.p95,
        "outbox_depth": m.outbox.depth,
    }


def telemetry_summary(body: dict[str, Any]) -> dict[str, Any]:
    """What fleet-wide queries read of a telemetry body (a subset with the same keys, so
    cloud_bridge/rollout/policy.py `aggregate` takes either): a few dozen bytes against ~3 KB."""
    out: dict[str, Any] = {"device_id": body.get("device_id"), "count": body.get("count", 0)}
    for key in ("rejected", "escalations", "confidence", "edge_latency_ms", "latency_ms", "outbox"):
        value = body.get(key)
        if value is None:
            continue
        if key == "confidence":
            value = {"mean": value["mean"]}
        elif key in ("edge_latency_ms", "latency_ms"):
            value = {"p95": value["p95"]}
        elif key == "outbox":
            value = {"depth": value.get("depth")}
        out[key] = value
    return out


def _sample_row(base: dict[str, str], m: Sample) -> dict[str, object]:
    return {
        **base,
        "model_name": m.model.name,
        "model_version": m.model.version,
        "inference_id": m.inference_id,
        "dtype": m.input.dtype,
        "shape": list(m.input.shape),
        # Already checked by decode_tensor in Ingestor._plan.
        "tensor": m.input.data,
        "topk": [{"label": t.label, "index": t.index, "prob": t.prob} for t in m.topk],
        "entropy": m.entropy,
        "margin": m.margin,
        "reasons": list(m.reasons),
        "predicted": m.predicted,
        "truth": m.truth,
        "ts": m.ts,
        "model_sha256": m.model.sha256,
        "source_ref": m.source_ref,
        "received_at": time.time(),
    }


def _alert_row(base: dict[str, str], m: Alert) -> dict[str, object]:
    return {
        **base,
        "alert_id": m.alert_id,
        "kind": m.kind,
        "state": m.state,
        "model_version": m.model.version,
        "score": m.score,
        "threshold": m.threshold,
        "detail": m.detail,
        "ts": m.ts,
    }
