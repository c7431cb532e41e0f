"""The demo's observer: subscribes to the whole fleet, keeps score, renders the live view and summary."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from schemas import (
    Alert,
    Answer,
    CommandAck,
    DecodeError,
    Result,
    Results,
    Sample,
    Status,
    Telemetry,
    Topics,
    decode_for_topic,
)

BUCKET_S = 2.0


@dataclass
class Bucket:
    """Results of one device in one BUCKET_S slice of the run (for the report's time series)."""

    results: int = 0
    with_truth: int = 0
    edge_right: int = 0
    final_right: int = 0
    escalated: int = 0


@dataclass(frozen=True, slots=True)
class Scored:
    """One answer whose true label the replay knew: when it came (seconds since the watch started), which
    model version gave it, which input (the replay's source_ref: "replay:drift:17" is the rotated copy
    of held-out digit 17), whether the edge's and the final answer were right, and whether the edge was
    unsure of it (escalated, or answered locally for want of the cloud: path is not "edge"), and whether
    it was sent to the cloud (path "cloud"; not when paused, offline, over budget or shed)."""

    at: float
    version: str
    ref: str
    edge_right: bool
    final_right: bool
    unsure: bool
    sent: bool = False

    @property
    def drifted(self) -> bool:
        return ":drift:" in self.ref


@dataclass(frozen=True)
class AlertEvent:
    at: float
    device: str
    kind: str
    state: str
    score: float
    threshold: float
    model: str
    window_start: float = 0.0  # unix time: the start of the windows the alert's score covers


@dataclass(frozen=True)
class AckEvent:
    at: float
    device: str
    state: str
    model: str
    reason: str


@dataclass
class DeviceView:
    state: str = "?"
    model: str = "?"
    results: int = 0
    edge_right: int = 0
    final_right: int = 0
    with_truth: int = 0
    escalated: int = 0
    fallbacks: int = 0
    samples: int = 0
    telemetry_count: int = 0
    last_p95_ms: float = 0.0
    last_conf: float = 0.0
    outbox_depth: int = 0
    windows: list[tuple[float, float, float]] = field(default_factory=list)  # (ts, conf mean, esc rate)
    result_ids: set[str] = field(default_factory=set)
    recent: list[float] = field(default_factory=list)
    buckets: dict[int, Bucket] = field(default_factory=lambda: defaultdict(Bucket))
    models_seen: dict[str, int] = field(default_factory=dict)  # model version -> results
    scored: list[Scored] = field(default_factory=list)  # every answer with a known truth, as they came
    first_result_at: float | None = None  # seconds since the watch started


class FleetWatch:
    def __init__(self, host: str, port: int, topics: Topics) -> None:
        self.topics = topics
        self.devices: dict[str, DeviceView] = defaultdict(DeviceView)
        self.invalid = 0
        self.duplicates = 0
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self.started = time.time()
        self.alerts: list[AlertEvent] = []
        self.acks: list[AckEvent] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-watch", protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *a: c.subscribe(f"{topics.prefix}/#", 1)
        self.client.on_message = self._on_message
        self.host, self.port = host, port

    def start(self) -> None:
        self.client.connect(self.host, self.port)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # samples/json is the bridge's JSON copy of each archived sample (same msg_id): not a device message.
        if msg.topic.endswith(("/escalate", "/reply", "/model/request", "/samples/json")) or "/models/" in msg.topic:
            return
        try:
            message = decode_for_topic(self.topics, msg.topic, msg.payload)
        except DecodeError:
            self.invalid += 1
            return
        with self._lock:
            if message.msg_id in self._seen:
                self.duplicates += 1
                return
            self._seen.add(message.msg_id)
            if isinstance(message, Alert):
                self.alerts.append(
                    AlertEvent(
                        message.ts - self.started,
                        message.device_id,
                        message.kind,
                        message.state,
                        message.score,
                        message.threshold,
                        message.model.version,
                        message.window_start,
                    )
                )
                return
            dev = self.devices[message.device_id]
            if isinstance(message, CommandAck):
                model = message.model.version if message.model is not None else ""
                self.acks.append(
                    AckEvent(message.ts - self.started, message.device_id, message.state, model, message.reason or "")
                )
            elif isinstance(message, Status):
                dev.state = message.state
                if message.model is not None:
                    dev.model = message.model.version  # one model name in the demo: its versions differ
            elif isinstance(message, Results):
                for answer in message.answers:
                    self._result(dev, message.model.version, message.ts, answer)
            elif isinstance(message, Result):
                self._result(dev, message.model.version, message.ts, message)
            elif isinstance(message, Sample):
                dev.samples += 1
            elif isinstance(message, Telemetry):
                dev.telemetry_count += message.count
                dev.outbox_depth = message.outbox.depth
                if message.latency_ms is not None:
                    dev.last_p95_ms = message.latency_ms.p95
                if message.confidence is not None and message.count:
                    dev.last_conf = message.confidence.mean
                    rate = message.escalations.sent / message.count
                    dev.windows.append((message.window_end, message.confidence.mean, rate))

    def _result(self, dev: DeviceView, version: str, ts: float, r: Answer | Result) -> None:
        bucket = dev.buckets[int((ts - self.started) // BUCKET_S)]
        bucket.results += 1
        bucket.escalated += r.path == "cloud"
        dev.models_seen[version] = dev.models_seen.get(version, 0) + 1
        if dev.first_result_at is None:
            dev.first_result_at = ts - self.started
        if r.truth is not None:
            bucket.with_truth += 1
            bucket.edge_right += r.edge_label == r.truth
            bucket.final_right += r.label == r.truth
            at = ts - self.started
            edge_right, final_right = r.edge_label == r.truth, r.label == r.truth
            unsure, sent = r.path != "edge", r.path == "cloud"
            dev.scored.append(Scored(at, version, r.source_ref or "", edge_right, final_right, unsure, sent))
        dev.results += 1
        dev.result_ids.add(r.inference_id)
        dev.recent.append(time.monotonic())
        dev.escalated += r.path == "cloud"
        dev.fallbacks += r.path == "edge_fallback"
        if r.truth is not None:
            dev.with_truth += 1
            dev.edge_right += r.edge_label == r.truth
            dev.final_right += r.label == r.truth

    def snapshot(self, device: str) -> list[Scored]:
        """A copy of a device's scored answers (the MQTT thread keeps appending)."""
        with self._lock:
            return list(self.devices[device].scored) if device in self.devices else []

    def firing(self) -> dict[str, float]:
        """Devices with a data-drift alert firing (latency alerts are not a data problem labels fix), each
        with the earliest start of a firing alert's windows (unix time): when its inputs began to look drifted."""
        latest: dict[tuple[str, str], AlertEvent] = {}
        with self._lock:
            for alert in self.alerts:
                if alert.kind != "latency":
                    latest[(alert.device, alert.kind)] = alert
        since: dict[str, float] = {}
        for (device, _), alert in latest.items():
            if alert.state == "firing":
                since[device] = min(since.get(device, alert.window_start), alert.window_start)
        return since

    def render(self, elapsed: float, total: float) -> str:
        now = time.monotonic()
        lines = [
            f"fleet view  t={elapsed:5.1f}s/{total:.0f}s  (invalid={self.invalid} duplicates={self.duplicates})",
            f"{'device':<10}{'state':<9}{'model version':<23}{'inf/s':>7}{'acc edge':>10}{'acc final':>10}"
            f"{'escal':>7}{'fallbk':>7}{'samples':>8}{'p95 ms':>8}{'conf':>6}{'outbox':>7}",
        ]
        with self._lock:
            for name in sorted(self.devices):
                d = self.devices[name]
                d.recent = [t for t in d.recent if now - t < 5.0]
                acc_e = d.edge_right / d.with_truth if d.with_truth else 0.0
                acc_f = d.final_right / d.with_truth if d.with_truth else 0.0
                lines.append(
                    f"{name:<10}{d.state:<9}{d.model:<23}{len(d.recent) / 5.0:>7.1f}{acc_e:>10.3f}{acc_f:>10.3f}"
                    f"{d.escalated:>7}{d.fallbacks:>7}{d.samples:>8}{d.last_p95_ms:>8.2f}{d.last_conf:>6.2f}"
                    f"{d.outbox_depth:>7}"
                )
            for alert in self.alerts[-4:]:
                lines.append(
                    f"alert t={alert.at:5.1f}s {alert.device} {alert.kind} {alert.state} "
                    f"score {alert.score:.2f} (threshold {alert.threshold:.2f}) model {alert.model}"
                )
            for ack in self.acks[-3:]:
                lines.append(f"cmd   t={ack.at:5.1f}s {ack.device} {ack.state} {ack.model} {ack.reason}")
        return "\n".join(lines)
