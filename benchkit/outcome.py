"""One fleet run's figures, its verdict (held or not, and why) and how they are printed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from benchkit.drain import Drain

SAMPLE_S = 5.0


@dataclass
class Outcome:
    label: str
    devices: int
    seconds: float
    sent: dict[str, int]
    msgs_per_s: float
    stored_per_s: float
    bridge_cpu_us: list[float]  # CPU per message sent
    bridge_cpu_share: list[float]
    bridge_handled_us: list[float]  # CPU per message the bridge finished with (stored, dup, escalation)
    bridge_runq_share: list[float]  # seconds runnable but waiting for a CPU, per second of the run
    other_cpu_us: dict[str, float]
    lag_first: float
    lag_last: float
    lag_max: float
    store_first: float
    store_last: float
    esc_sent: int
    esc_in_time: float
    esc_p50: float
    esc_p99: float
    sim_late_s: float
    sim_runq_share: float
    sim_own_us: float  # the simulator's CPU per message sent, as it measured itself
    confirmed: int
    unconfirmed: int
    growth_per_device_day: float
    rss_per_device: float
    queries: dict[str, float] = field(default_factory=dict)
    lock_waits: int = 0  # PostgreSQL: backends waiting on a lock, summed over the 5 s samples
    drain: Drain | None = None  # throughput on a backlog, after the run (--drain-s)
    held: bool = False
    why: str = ""

    def judge(self, max_lag_s: float) -> None:
        """Held: the lag's last third under `max_lag_s` and not growing, the broker's store not
        growing, >= 99% of escalations answered in time, and the simulator on its schedule (if it
        was not, the machine was the limit, not the bridge)."""
        ingest = sum(v for k, v in self.sent.items() if k != "escalate") / self.seconds
        reasons = []
        if self.lag_last > max_lag_s:
            reasons.append(f"lag {self.lag_last:.1f} s > {max_lag_s:g} s")
        if self.lag_last > self.lag_first + 2.0:
            reasons.append(f"lag growing {self.lag_first:.1f} -> {self.lag_last:.1f} s")
        if self.store_last > self.store_first + max(2000, 0.05 * ingest * SAMPLE_S):
            reasons.append(f"broker store growing {self.store_first:.0f} -> {self.store_last:.0f}")
        if self.esc_in_time < 0.99:
            reasons.append(f"escalations answered in time {self.esc_in_time:.1%} (< 99%)")
        if self.sim_late_s > 1.0:
            reasons.append(f"simulator behind its schedule by {self.sim_late_s:.1f} s (the machine, not the bridge)")
        self.held = not reasons
        self.why = "; ".join(reasons) or "held"


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def print_outcome(o: Outcome) -> None:
    kinds = ", ".join(f"{k} {v / o.seconds:.0f}/s" for k, v in sorted(o.sent.items()))
    print(
        f"[{o.label}] {o.devices} devices, {o.seconds:.0f} s: {o.msgs_per_s:.0f} msgs/s sent ({kinds}); "
        f"bridges stored {o.stored_per_s:.0f} msgs/s",
        flush=True,
    )
    cpu = ", ".join(
        f"{u:.0f} us per message sent, {h:.0f} us per message handled ({s:.0%} of a core, "
        f"waited for a CPU {q:.0%} of the time)"
        for u, h, s, q in zip(
            o.bridge_cpu_us, o.bridge_handled_us, o.bridge_cpu_share, o.bridge_runq_share, strict=True
        )
    )
    others = ", ".join(f"{k} {v:.0f} us" for k, v in o.other_cpu_us.items())
    others += f" (simulator's own count {o.sim_own_us:.0f} us; it waited for a CPU {o.sim_runq_share:.0%} of the time)"
    if "postgresql" in o.other_cpu_us:
        others += f"; lock waits seen {o.lock_waits} (samples every {SAMPLE_S:g} s)"
    print(f"  CPU per message: bridge(s) {cpu}; {others}")
    print(
        f"  lag device->stored: first third {o.lag_first:.2f} s, last third {o.lag_last:.2f} s, max {o.lag_max:.2f} s;"
        f" broker store {o.store_first:.0f} -> {o.store_last:.0f}; confirmed to the devices {o.confirmed}, "
        f"unconfirmed at the end {o.unconfirmed}"
    )
    print(
        f"  escalations: {o.esc_sent} sent, {o.esc_in_time:.1%} answered in time, p50 {o.esc_p50:.0f} ms, "
        f"p99 {o.esc_p99:.0f} ms; simulator max lateness {o.sim_late_s:.2f} s"
    )
    print(
        f"  registry growth {o.growth_per_device_day / 1e6:.2f} MB per device-day; "
        f"bridge RSS {o.rss_per_device / 1024:.1f} KiB per device"
    )
    if o.queries:
        print("  queries at this size: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in o.queries.items()))
    if o.drain is not None:
        print(o.drain.line())
    print(f"  verdict: {'HELD' if o.held else 'not held'} ({o.why})", flush=True)
