"""The simulator's counts summed over its worker processes, and what they say: one progress line per
interval, a summary at the end and the verdict (did the broker and the bridges keep up?)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Counters every worker line carries, cumulative since the worker started.
CUMULATIVE = (
    "acked",
    "answers",
    "escalations",
    "answered",
    "timed_out",
    "late_replies",
    "commands",
    "errors",
    "confirmed",
    "cpu_s",
    "sys_s",
)
# Gauges: the worker's value now, summed (or the largest) over workers.
GAUGES = ("in_flight", "outstanding", "unconfirmed", "devices")
MAX_KEPT_LATENCIES = 1_000_000


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class Snapshot:
    """The whole simulator at one moment (`latencies_ms` and `late_s`: since the previous snapshot)."""

    t: float
    sent: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    values: dict[str, float] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    late_s: float = 0.0
    oldest_unconfirmed_s: float = 0.0
    confirm_age_max_s: float = 0.0

    def __getitem__(self, key: str) -> float:
        return self.values.get(key, 0.0)

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())


def merge(t: float, latest: list[dict[str, Any]], since: list[dict[str, Any]]) -> Snapshot:
    """One snapshot from each worker's latest line (`latest`) and every line since the last one."""
    snap = Snapshot(t)
    for line in latest:
        snap.sent.update(line.get("sent", {}))
        snap.refused.update(line.get("refused", {}))
        for key in (*CUMULATIVE, *GAUGES):
            snap.values[key] = snap.values.get(key, 0.0) + float(line.get(key, 0))
        snap.oldest_unconfirmed_s = max(snap.oldest_unconfirmed_s, float(line.get("oldest_unconfirmed_s", 0.0)))
    for line in since:
        snap.latencies_ms.extend(line.get("latencies_ms", []))
        snap.late_s = max(snap.late_s, float(line.get("late_s", 0.0)))
        snap.confirm_age_max_s = max(snap.confirm_age_max_s, float(line.get("confirm_age_max_s", 0.0)))
    return snap


@dataclass
class Run:
    """Every snapshot of a run, and what it says."""

    devices: int
    timeout_s: float
    snapshots: list[Snapshot] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    late_s: float = 0.0  # the most the simulator fell behind its schedule

    def add(self, snap: Snapshot) -> None:
        self.snapshots.append(snap)
        room = MAX_KEPT_LATENCIES - len(self.latencies_ms)
        self.latencies_ms.extend(snap.latencies_ms[:room])
        self.late_s = max(self.late_s, snap.late_s)

    def progress(self, start: Snapshot) -> str:
        """One line: rates since the previous snapshot, gauges now."""
        cur = self.snapshots[-1]
        prev = self.snapshots[-2] if len(self.snapshots) > 1 else start
        dt = max(cur.t - prev.t, 1e-9)
        kinds = ", ".join(f"{k} {(cur.sent[k] - prev.sent[k]) / dt:.0f}" for k in sorted(cur.sent))
        sent = (cur.total_sent - prev.total_sent) / dt
        asked = cur["answered"] + cur["timed_out"] - prev["answered"] - prev["timed_out"]
        in_time = (cur["answered"] - prev["answered"]) / asked if asked else math.nan
        lat = cur.latencies_ms
        n = max(1, cur.total_sent - prev.total_sent)
        cpu = (cur["cpu_s"] - prev["cpu_s"]) / n * 1e6
        system = (cur["sys_s"] - prev["sys_s"]) / n * 1e6
        confirmed = (cur["confirmed"] - prev["confirmed"]) / dt
        return (
            f"[{cur.t - start.t:5.0f} s] sent {sent:,.0f} msgs/s ({kinds}); broker in flight {cur['in_flight']:.0f}"
            f" | escalations {in_time:.1%} answered in time, p50 {pct(lat, 0.5):.0f} ms, p99 {pct(lat, 0.99):.0f} ms"
            f" | confirmed {confirmed:,.0f}/s, unconfirmed {cur['unconfirmed']:,.0f}"
            f" (oldest {cur.oldest_unconfirmed_s:.1f} s)"
            f" | simulator {cpu:.0f} us CPU/msg ({system:.0f} in the kernel), behind {cur.late_s:.2f} s"
        )

    def summary(self, start: Snapshot, end: Snapshot, *, confirms: bool, max_unconfirmed_s: float) -> list[str]:
        """The run in a few lines; the last says whether the cloud side kept up, and why not."""
        dt = max(end.t - start.t, 1e-9)
        sent = end.total_sent - start.total_sent
        asked = end["answered"] + end["timed_out"]
        in_time = end["answered"] / asked if asked else 1.0
        p50, p99 = pct(self.latencies_ms, 0.5), pct(self.latencies_ms, 0.99)
        lines = [
            f"offered {sent / dt:,.0f} msgs/s from {self.devices:,} devices for {dt:.0f} s "
            f"({', '.join(f'{k} {v:,}' for k, v in sorted(end.sent.items()))} in all); "
            f"the broker acknowledged {end['acked']:,.0f}",
            f"escalations: {end['escalations']:,.0f} sent, {in_time:.1%} answered within the devices' "
            f"{self.timeout_s:g} s, p50 {p50:.0f} ms, p99 {p99:.0f} ms,"
            f" {end['late_replies']:,.0f} answers came after the device gave up",
            f"simulator: {end['cpu_s'] / max(1, end.total_sent) * 1e6:.0f} us of CPU per message sent, "
            f"at most {self.late_s:.2f} s behind its schedule",
        ]
        if confirms:
            lines.append(
                f"confirmed stored by the bridges: {end['confirmed']:,.0f}; still unconfirmed {end['unconfirmed']:,.0f}"
                f" (the oldest sent {end.oldest_unconfirmed_s:.1f} s ago)"
            )
        if end.refused:
            lines.append("the broker refused: " + ", ".join(f"{k} x{v}" for k, v in sorted(end.refused.items())))
        reasons = self.problems(end, in_time, confirms=confirms, max_unconfirmed_s=max_unconfirmed_s)
        lines.append("verdict: " + ("kept up" if not reasons else "did not keep up: " + "; ".join(reasons)))
        return lines

    def problems(self, end: Snapshot, in_time: float, *, confirms: bool, max_unconfirmed_s: float) -> list[str]:
        reasons = []
        if in_time < 0.99:
            reasons.append(f"{in_time:.1%} of escalations answered in time (< 99%)")
        if confirms and end.oldest_unconfirmed_s > max_unconfirmed_s:
            reasons.append(f"a message unconfirmed for {end.oldest_unconfirmed_s:.0f} s (> {max_unconfirmed_s:g} s)")
        if end.refused:
            reasons.append(f"{sum(end.refused.values())} publishes refused by the broker")
        if end["errors"]:
            reasons.append(f"{end['errors']:.0f} undecodable messages from the cloud")
        if self.late_s > 1.0:
            reasons.append(f"the simulator fell {self.late_s:.1f} s behind its schedule (this machine, not the cloud)")
        return reasons
