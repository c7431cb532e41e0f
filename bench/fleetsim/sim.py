"""The simulator process: `devices` simulated devices over `connections` paho MQTT 5 connections.

Every device runs the schedule of `device.Profile` on one shared clock: the devices are dealt to ten
slots and each 100 ms tick serves one slot, so every device is visited once a second (its inferences
of that second, its result/2 message, and every `telemetry_s` its window). A slot's inferences are
drawn in one numpy pass. The connections are driven from this one thread (fleetsim/links.py):
publishes go out at once, replies and commands are read between ticks.

The process prints one JSON line per `report_s` (counters so far, escalation latencies since the last
line, how late the tick loop runs) and a last one after "stop" arrives on stdin: then every device
publishes its offline status (reason "shutdown") and the connections close.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetsim.device import Device, Profile
from fleetsim.links import Inbox, Link, pump, pump_until
from schemas import (
    ClockReply,
    ClockRequest,
    Command,
    DecodeError,
    Envelope,
    EscalationReply,
    decode_for_topic,
    new_msg_id,
)
from schemas.compact import ENCODING, encode_compact
from schemas.topics import Channel, Topics

TICKS_PER_S = 10


@dataclass
class Counts:
    sent: Counter[str] = field(default_factory=Counter)
    escalations: int = 0
    answered: int = 0
    late_replies: int = 0
    timed_out: int = 0
    commands: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    tick_late_s: float = 0.0


class Simulator:
    def __init__(self, args: dict[str, Any]) -> None:
        self.topics = Topics(args["prefix"])
        self.fleet = args["fleet"]
        self.profile = Profile(**args["profile"])
        rng = self.rng = np.random.default_rng(args["seed"])
        first, count = args["first"], args["devices"]
        drifting = round(count * self.profile.drift_share)
        self.devices = [
            Device(self.topics, self.fleet, f"sim-{first + i:06d}", self.profile, i < drifting, rng)
            for i in range(count)
        ]
        self.by_name = {d.name: d for d in self.devices}
        self.inbox: Inbox = deque()
        n = max(1, args["connections"])
        self.links = [Link(args["host"], args["port"], f"fleetsim-{args['seed']}-{i}", self.inbox) for i in range(n)]
        if not pump_until(self.links, time.monotonic() + 30, lambda: all(k.client.is_connected() for k in self.links)):
            raise RuntimeError("simulator: no CONNACK within 30 s")
        self.link_of = {d.name: self.links[i % n] for i, d in enumerate(self.devices)}
        self.outstanding: dict[str, tuple[Device, str, float, float, int]] = {}
        self.counts = Counts()
        self.started = time.time()
        self.report_s = float(args["report_s"])
        self.encoding_ok = False

    def publish(self, device: Device, channel: Channel, message: Envelope, kind: str, retain: bool = False) -> None:
        self.link_of[device.name].publish(device.topic(channel), encode_compact(message), retain)
        self.counts.sent[kind] += 1

    def _drain_inbox(self) -> None:
        while self.inbox:
            self._handle(*self.inbox.popleft())

    def start(self) -> None:
        wanted = [0] * len(self.links)
        for i, link in enumerate(self.links):
            channels = (Channel.ESCALATE_REPLY, Channel.CMD, Channel.CLOCK_REPLY)
            filters = [(d.topic(ch), 1) for d in self.devices if self.link_of[d.name] is link for ch in channels]
            wanted[i] = link.subscribe(filters)
        subscribed = lambda: all(k.subacks >= n for k, n in zip(self.links, wanted, strict=True))  # noqa: E731
        if not pump_until(self.links, time.monotonic() + 60, subscribed):
            raise RuntimeError("simulator: no SUBACK within 60 s")
        # One clock exchange, as a node does at connect: the bridge's reply says it reads compact.
        probe = self.devices[0]
        request = ClockRequest(msg_id=new_msg_id(), fleet_id=self.fleet, device_id=probe.name, ts=time.time())
        self.link_of[probe.name].publish(probe.topic(Channel.CLOCK), encode_compact(request))

        def compact_announced() -> bool:
            self._drain_inbox()
            return self.encoding_ok

        pump_until(self.links, time.monotonic() + 30, compact_announced)
        if not self.encoding_ok:
            raise RuntimeError("simulator: no clock/1 reply announcing the compact encoding within 30 s")
        for d in self.devices:
            self.publish(d, Channel.STATUS, d.status(True), "status", retain=True)

    def _handle(self, at: float, topic: str, payload: bytes) -> None:
        try:
            message = decode_for_topic(self.topics, topic, payload)
        except DecodeError as exc:  # counted and shown: the bridge sent something the contract refuses
            self.counts.errors += 1
            print(f"simulator: undecodable message on {topic}: {exc}", file=sys.stderr, flush=True)
            return
        if isinstance(message, EscalationReply):
            self._reply(at, message)
        elif isinstance(message, Command):
            self._command(message)
        elif isinstance(message, ClockReply):
            self.encoding_ok = ENCODING in message.accepts

    def _reply(self, at: float, reply: EscalationReply) -> None:
        entry = self.outstanding.pop(reply.request_id, None)
        if entry is None:
            self.counts.late_replies += 1  # after the device gave up (its answer went out as edge_fallback)
            return
        device, label, confidence, sent, inference = entry
        ms = (at - sent) * 1000
        self.counts.answered += 1
        self.counts.latencies_ms.append(ms)
        device.window.answered += 1
        cloud = reply.label if reply.label is not None else label
        device.answer(f"{device.name}-{inference}", cloud, reply.confidence or confidence, "cloud", label, ms)

    def _command(self, cmd: Command) -> None:
        device = self.by_name.get(cmd.device_id)
        if device is None:
            return
        self.counts.commands += 1
        self.publish(device, Channel.CMD_ACK, device.ack(cmd.cmd_id, "received", None, cmd.rollout_id), "cmd_ack")
        if cmd.action == "model_update" and cmd.update is not None:
            device.model = cmd.update.model
        self.publish(
            device, Channel.CMD_ACK, device.ack(cmd.cmd_id, "installed", device.model, cmd.rollout_id), "cmd_ack"
        )

    def _visit_slot(self, slot: list[Device], cum: npt.NDArray[np.float64], now: float) -> None:
        """Every device of a slot: its inferences of this second, drawn for the whole slot in one
        numpy pass (`cum`: each device's cumulative class mix, a row per device of the slot)."""
        hz = self.profile.hz
        for i, d in enumerate(slot):
            if d.drifts and not d.drifting and now - self.started >= self.profile.drift_after_s:
                d.drifting = True
                cum[i] = np.cumsum(d.mix_now())
        rng = self.rng
        counts = np.full(len(slot), int(hz)) + (rng.random(len(slot)) < hz % 1)
        rows = np.repeat(np.arange(len(slot)), counts)
        draws = rng.random((len(rows), 4))
        labels = (draws[:, :1] > cum[rows]).sum(axis=1).clip(max=9).tolist()
        u, u2, u3 = draws[:, 1].tolist(), draws[:, 2].tolist(), draws[:, 3].tolist()
        for j, row in enumerate(rows.tolist()):
            self._infer(slot[row], now, labels[j], u[j], u2[j], u3[j])
        for d in slot:
            self._after(d, now)

    def _infer(self, d: Device, now: float, label_index: int, u: float, u2: float, u3: float) -> None:
        label, confidence, escalate, sample = d.infer(now, label_index, u, u2, u3)
        if sample:
            self.publish(d, Channel.SAMPLES, d.sample(f"{d.name}-{d.inference}", label, confidence), "sample")
        if escalate:
            request_id = f"{d.name}-{d.inference}"
            deadline = now + self.profile.escalation_timeout_s
            self.outstanding[request_id] = (d, label, confidence, time.time(), d.inference)
            self.publish(d, Channel.ESCALATE, d.escalation(request_id, label, confidence, deadline), "escalate")
            self.counts.escalations += 1
            d.window.escalated += 1
        else:
            d.answer(f"{d.name}-{d.inference}", label, confidence, "edge", label, 0.3)

    def _after(self, d: Device, now: float) -> None:
        results = d.results(now, self.profile.results_delay_s)
        if results is not None:
            self.publish(d, Channel.RESULTS, results, "results")
        if now - d.window.start >= self.profile.telemetry_s:
            self.publish(d, Channel.TELEMETRY, d.telemetry(now), "telemetry")

    def _expire(self, now: float) -> None:
        limit = now - self.profile.escalation_timeout_s
        expired = [rid for rid, entry in self.outstanding.items() if entry[3] < limit]
        for rid in expired:
            device, label, confidence, _sent, inference = self.outstanding.pop(rid)
            self.counts.timed_out += 1
            device.window.timed_out += 1
            ms = self.profile.escalation_timeout_s * 1000
            device.answer(f"{device.name}-{inference}", label, confidence, "edge_fallback", label, ms)

    def report(self, final: bool = False) -> None:
        c = self.counts
        line = {
            "t": time.time(),
            "final": final,
            "sent": dict(c.sent),
            "escalations": c.escalations,
            "answered": c.answered,
            "timed_out": c.timed_out,
            "late_replies": c.late_replies,
            "commands": c.commands,
            "errors": c.errors,
            "latencies_ms": [round(v, 2) for v in c.latencies_ms],
            "tick_late_s": round(c.tick_late_s, 3),
            "outstanding": len(self.outstanding),
        }
        c.latencies_ms = []
        c.tick_late_s = 0.0
        print(json.dumps(line), flush=True)

    def run(self, stop: threading.Event) -> None:
        slots = [self.devices[i::TICKS_PER_S] for i in range(TICKS_PER_S)]
        cums = [np.array([np.cumsum(d.mix_now()) for d in slot]).reshape(len(slot), 10) for slot in slots]
        tick = 0
        t0 = time.monotonic()
        next_report = t0 + self.report_s
        while not stop.is_set():
            due = t0 + tick / TICKS_PER_S
            wait = due - time.monotonic()
            if wait > 0:
                pump_until(self.links, due)
            else:
                self.counts.tick_late_s = max(self.counts.tick_late_s, -wait)
                pump(self.links, 0.0)
            now = time.time()
            self._drain_inbox()
            self._visit_slot(slots[tick % TICKS_PER_S], cums[tick % TICKS_PER_S], now)
            self._expire(now)
            tick += 1
            if time.monotonic() >= next_report:
                self.report()
                next_report += self.report_s
        for d in self.devices:
            self.publish(d, Channel.STATUS, d.status(False, "shutdown"), "status", retain=True)
        pump_until(self.links, time.monotonic() + 10, lambda: not any(k.client.want_write() for k in self.links))
        for link in self.links:
            link.close()
        self.report(final=True)


def child_main(spec: str) -> None:
    """Run the simulator described by the JSON `spec` until a line arrives on stdin."""
    sim = Simulator(json.loads(spec))
    sim.start()
    print(json.dumps({"ready": True, "devices": len(sim.devices)}), flush=True)
    stop = threading.Event()

    def wait_for_stop() -> None:
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=wait_for_stop, daemon=True).start()
    sim.run(stop)
