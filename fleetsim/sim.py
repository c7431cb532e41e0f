"""One simulator process: `devices` simulated devices over a few MQTT 5 connections, one thread.

Every device runs the schedule of `Profile` on one shared clock: the devices are dealt to ten slots
and each 100 ms tick serves one slot, so every device is visited once a second: its inferences of
that second (drawn for the whole slot in one numpy pass), its result/2 message once the oldest
answer waited `results_delay_s`, its telemetry window every `telemetry_s`. A tick's messages carry
the tick's scheduled time; when the process falls behind, ticks run back to back with their own
(past) times, so lateness shows as lag downstream and as `behind_s` here. The connections are
written once per tick and read between ticks (fleetsim/mqtt5.py); replies, commands and
confirmations are handled as they are read (fleetsim/inbound.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetsim.device import CLASSES, Device, Population
from fleetsim.inbound import Inbound
from fleetsim.mqtt5 import Connection, LinkError, flush_all, pump, pump_until
from fleetsim.options import Spec
from fleetsim.wire import float32
from schemas.topics import Channel, Topics

TICKS_PER_S = 10


@dataclass
class Counts:
    """What one process did (cumulative) and saw since its last report (`latencies_ms`, `late_s`)."""

    sent: Counter[str] = field(default_factory=Counter)
    answers: int = 0  # answers in the result/2 messages sent
    escalations: int = 0
    answered: int = 0
    timed_out: int = 0
    late_replies: int = 0
    commands: int = 0
    errors: int = 0
    confirmed: int = 0
    confirm_age_max_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    late_s: float = 0.0


@dataclass
class Outstanding:
    """An escalation awaiting the cloud's answer."""

    device: Device
    number: int
    label: int
    confidence: float
    sent: float


class Simulator:
    def __init__(self, spec: Spec) -> None:
        self.spec, self.profile = spec, spec.profile
        self.topics = Topics(spec.prefix)
        self.rng = np.random.default_rng(spec.seed)
        self.started = time.time()
        self.pop = Population(spec.devices, spec.profile, self.rng, self.started)
        epochs = self.rng.integers(1 << 48, size=spec.devices).tolist()
        self.devices = [
            Device(self.topics, spec.fleet, spec.device_format.format(spec.first + i), i, f"{epochs[i]:x}")
            for i in range(spec.devices)
        ]
        self.by_name = {d.name: d for d in self.devices}
        self.outstanding: dict[str, Outstanding] = {}
        self.counts = Counts()
        self.track = spec.track_confirms
        self.encoding_ok = False
        self.drift_started = False
        self.inbound = Inbound(self)
        n = max(1, min(spec.connections, spec.devices))
        client = f"{spec.client_prefix}-{spec.fleet}-{spec.first}-{os.getpid()}"
        broker = spec.broker.resolve()
        self.links = [Connection(broker, f"{client}-{i}", self.inbound.handle) for i in range(n)]
        self.link_of = [self.links[i % n] for i in range(spec.devices)]

    def publish(self, device: Device, channel: Channel, payload: bytes, kind: str, retain: bool = False) -> None:
        self.link_of[device.index].publish(device.wire_topic[channel], payload, kind, retain)
        self.counts.sent[kind] += 1

    def start(self, timeout_s: float = 60.0) -> None:
        """Subscribe every device, check a bridge reads the compact encoding, publish the births."""
        channels = [Channel.ESCALATE_REPLY, Channel.CMD] + ([Channel.CONFIRM] if self.track else [])
        wanted = [0] * len(self.links)
        for i, link in enumerate(self.links):
            mine = self.devices[i :: len(self.links)]
            wanted[i] = link.subscribe([d.topic[ch] for d in mine for ch in channels])
        probe = self.devices[0]
        wanted[0] += self.links[0].subscribe([probe.topic[Channel.CLOCK_REPLY]])
        subscribed = lambda: all(k.subacks >= n for k, n in zip(self.links, wanted, strict=True))  # noqa: E731
        if not pump_until(self.links, time.monotonic() + timeout_s, subscribed):
            raise LinkError(f"no SUBACK within {timeout_s:g} s")
        # One clock exchange, as a node does at connect: the bridge's reply says it reads compact.
        self.link_of[0].publish(probe.wire_topic[Channel.CLOCK], self.inbound.clock_request(probe), "clock")
        if not pump_until(self.links, time.monotonic() + timeout_s, lambda: self.encoding_ok):
            raise LinkError(
                f"no clock/1 reply announcing the compact encoding within {timeout_s:g} s on "
                f"{probe.topic[Channel.CLOCK]}: is a cloud bridge running on this broker with the same"
                " topic prefix and fleet?"
            )
        now = time.time()
        for d in self.devices:
            self.publish(d, Channel.STATUS, d.status(now, True, self.track), "status", retain=True)
        flush_all(self.links)

    def run(self, stop: threading.Event, report: Any, report_s: float) -> None:
        """Tick until `stop` is set, calling `report(final=False)` every `report_s`."""
        slots = [np.arange(i, self.spec.devices, TICKS_PER_S) for i in range(TICKS_PER_S)]
        wall0, mono0 = time.time(), time.monotonic()
        tick = 0
        next_report = mono0 + report_s
        while not stop.is_set():
            due = mono0 + tick / TICKS_PER_S
            wait = due - time.monotonic()
            if wait > 0:
                pump_until(self.links, due)
            else:
                self.counts.late_s = max(self.counts.late_s, -wait)
                pump(self.links, 0.0)
            scheduled = wall0 + tick / TICKS_PER_S
            self._visit(slots[tick % TICKS_PER_S], scheduled)
            self._expire(time.time())
            flush_all(self.links)
            tick += 1
            if time.monotonic() >= next_report:
                report(final=False)
                next_report += report_s

    def _visit(self, slot: npt.NDArray[np.intp], now: float) -> None:
        """Every device of a slot: its inferences of this second, its due result/2 and telemetry."""
        pop, rng, prof = self.pop, self.rng, self.profile
        if not self.drift_started and now - self.started >= prof.drift_after_s:
            self.drift_started = True
            drifting = np.flatnonzero(pop.drifts)
            pop.start_drift(drifting)
            for i in drifting.tolist():
                self.devices[i].drifting = True
        whole, part = divmod(prof.hz, 1.0)
        per_device = np.full(len(slot), int(whole)) + (rng.random(len(slot)) < part)
        rows = np.repeat(slot, per_device)
        if len(rows):
            self._infer(rows, per_device, slot, now)
        devices, delay, limit = self.devices, prof.results_delay_s, prof.results_max_answers
        for i in slot.tolist():
            d = devices[i]
            if d.pending and (now - d.pending_since >= delay or len(d.pending) >= limit):
                self.counts.answers += min(limit, len(d.pending))
                self.publish(d, Channel.RESULTS, d.results(now, limit, self.track), "results")
        due = slot[now - pop.window_start[slot] >= prof.telemetry_s]
        if len(due):
            for i, (counts, mean, std) in zip(due.tolist(), pop.close_windows(due, now, rng), strict=True):
                d = devices[i]
                self.publish(d, Channel.TELEMETRY, d.telemetry(now, counts, mean, std, self.track), "telemetry")

    def _infer(
        self, rows: npt.NDArray[np.intp], per_device: npt.NDArray[np.int64], slot: npt.NDArray[np.intp], now: float
    ) -> None:
        pop, prof = self.pop, self.profile
        draws = self.rng.random((len(rows), 5))
        labels = (draws[:, :1] > pop.cum[rows]).sum(axis=1).clip(max=CLASSES - 1)
        escalate = draws[:, 1] < prof.escalate_share
        confidence = np.where(escalate, 0.4 + 0.2 * draws[:, 2], 0.8 + 0.2 * draws[:, 2]).astype(np.float32)
        latency = (0.25 + 0.5 * draws[:, 3]).astype(np.float32)
        starts = np.repeat(np.cumsum(per_device) - per_device, per_device)
        numbers = pop.inferences[rows] + np.arange(len(rows)) - starts + 1
        pop.inferences[slot] += per_device
        np.add.at(pop.classes, (rows, labels), 1)
        edge = ~escalate
        np.add.at(pop.paths[:, 0], rows[edge], 1)
        devices = self.devices
        phase = pop.results_phase
        for i, number, label, conf, lat in zip(
            rows[edge].tolist(),
            numbers[edge].tolist(),
            labels[edge].tolist(),
            confidence[edge].tolist(),
            latency[edge].tolist(),
            strict=True,
        ):
            d = devices[i]
            if not d.pending:
                # The first answer of a run starts at the device's phase; later ones follow on.
                d.pending_since = now - phase[i] if d.seq <= 1 else now
            d.pending.append((number, label, label, -1, "edge", None, conf, lat))
        if escalate.any():
            self._escalate(rows[escalate], numbers[escalate], labels[escalate], confidence[escalate], draws, now)

    def _escalate(
        self,
        rows: npt.NDArray[np.intp],
        numbers: npt.NDArray[np.int64],
        labels: npt.NDArray[np.int64],
        confidence: npt.NDArray[np.float32],
        draws: npt.NDArray[np.float64],
        now: float,
    ) -> None:
        """Unsure inputs: each asked of the cloud; some also sent as samples, within the budget."""
        pop, prof = self.pop, self.profile
        np.add.at(pop.escalations[:, 0], rows, 1)
        inputs = pop.inputs(rows, self.rng)
        sample_given = min(1.0, prof.sample_share / max(prof.escalate_share, 1e-9))
        u = draws[: len(rows), 4].tolist()
        timeout = prof.escalation_timeout_s
        for i, number, label, conf, data, v in zip(
            rows.tolist(), numbers.tolist(), labels.tolist(), confidence.tolist(), inputs, u, strict=True
        ):
            d = self.devices[i]
            if v < sample_given and d.take_sample(now, prof.samples_per_minute):
                pop.samples[i] += 1
                self.publish(d, Channel.SAMPLES, d.sample(now, number, label, conf, data, self.track), "sample")
            self.outstanding[f"{d.inference_prefix}{number}"] = Outstanding(d, number, label, conf, now)
            self.publish(d, Channel.ESCALATE, d.escalation(now, number, label, conf, data, timeout), "escalate")
            self.counts.escalations += 1

    def _expire(self, now: float) -> None:
        """Escalations past the device's timeout: answered at the edge (edge_fallback)."""
        limit = now - self.profile.escalation_timeout_s
        expired = []
        for request_id, entry in self.outstanding.items():
            if entry.sent >= limit:
                break  # insertion order is send order
            expired.append(request_id)
        ms = float32(self.profile.escalation_timeout_s * 1000)
        for request_id in expired:
            entry = self.outstanding.pop(request_id)
            self.counts.timed_out += 1
            self.answer(entry, entry.label, entry.confidence, "edge_fallback", "timeout", ms, now)

    def answer(
        self, entry: Outstanding, label: int, confidence: float, path: str, reason: str | None, ms: float, now: float
    ) -> None:
        """An escalated input's final answer, waiting for the device's next result/2."""
        d = entry.device
        column = {"cloud": 1, "edge_fallback": 2}[path]
        self.pop.paths[d.index, column] += 1
        self.pop.escalations[d.index, column] += 1
        if not d.pending:
            d.pending_since = now
        cloud = label if path == "cloud" else -1
        d.pending.append((entry.number, label, entry.label, cloud, path, reason, float32(confidence), ms))

    def stop(self, drain_s: float, report: Any) -> None:
        """Offline statuses, every PUBACK, then up to `drain_s` for the last confirmations."""
        now = time.time()
        for d in self.devices:
            self.publish(d, Channel.STATUS, d.status(now, False, self.track), "status", retain=True)
        pump_until(self.links, time.monotonic() + 30, lambda: not any(k.inflight or k.queued for k in self.links))
        if self.track and drain_s > 0:
            deadline = time.monotonic() + drain_s
            next_report = time.monotonic() + 5
            while time.monotonic() < deadline and self.unconfirmed():
                pump_until(self.links, min(deadline, next_report))
                if time.monotonic() >= next_report:
                    report(final=False)
                    next_report += 5
        for link in self.links:
            link.close()

    def unconfirmed(self) -> int:
        return sum(len(d.unconfirmed) for d in self.devices)

    def oldest_unconfirmed(self) -> float | None:
        """The scheduled time of the oldest message no confirm/1 named yet."""
        return min((next(iter(d.unconfirmed.values())) for d in self.devices if d.unconfirmed), default=None)
