"""Throughput on a backlog: the bridges paused while the fleet goes on sending, then the simulator
paused and the bridges let go on what the broker queued for them.

A fleet that the bridges keep up with measures the offered load, not what the bridges can do: one
and two bridges both store what the devices send, and at a light load two commit smaller batches
and look dearer per message. A backlog is the same work for any number of bridges, taken at full
batches: the rate at which they store it is their throughput, and their CPU over those seconds per
message stored is what a message costs them at full load.

The pause is SIGSTOP, shorter than the bridges' keepalive (30 s; the broker waits 1.5x that before it
drops a session), so their connections and in-flight windows stay as they were. Escalations are not
counted (they are not stored): those that waited past their expiry are dropped by the broker or the
escalator. Their answer latencies during the pause are left out of the run's escalation figures.
The simulator is paused the same way while the bridges drain, so nothing new arrives.

A drain lasts 20-50 s, and each bridge publishes its delivery confirmations in one burst every 20 s
(~10,000 at 10,000 devices): whether a drain holds one burst or two moved a run's CPU per message by
10% or more. `--drains K` repeats the pause and the drain K times and sums them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from benchkit.watch import RegistryLag, proc_sample

POLL_S = 0.25
STILL_POLLS = 8  # the count unchanged for this many polls (2 s): drained
# A bridge let go may take a while to commit its first batch (one that lagged before the pause had a
# queue of its own to finish): the backlog is drained only once storing started and then stopped.
FIRST_COMMIT_S = 30.0


@dataclass
class Drain:
    messages: int  # stored from the backlog
    seconds: float  # from letting the bridges go to the last message stored
    bridge_cpu_s: float  # all bridges together, over those seconds
    other_cpu_s: dict[str, float]  # broker, postgresql over those seconds

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def bridge_us(self) -> float:
        return self.bridge_cpu_s / max(1, self.messages) * 1e6

    def __add__(self, other: Drain) -> Drain:
        """Two drains as one: their messages, seconds and CPU summed."""
        keys = self.other_cpu_s.keys() | other.other_cpu_s.keys()
        return Drain(
            self.messages + other.messages,
            self.seconds + other.seconds,
            self.bridge_cpu_s + other.bridge_cpu_s,
            {k: self.other_cpu_s.get(k, 0.0) + other.other_cpu_s.get(k, 0.0) for k in sorted(keys)},
        )

    def line(self) -> str:
        others = ", ".join(f"{k} {v / max(1, self.messages) * 1e6:.0f} us" for k, v in self.other_cpu_s.items())
        return (
            f"  backlog drain: {self.messages} messages stored in {self.seconds:.1f} s = {self.rate:.0f} msgs/s; "
            f"CPU per message stored: bridge(s) {self.bridge_us:.0f} us, {others}"
        )


def _signal(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@contextlib.contextmanager
def _paused(pids: Sequence[int], *, now: bool = True) -> Iterator[None]:
    """SIGCONT to `pids` on the way out, whatever happens (SIGSTOP first if `now`)."""
    if now:
        _signal(pids, signal.SIGSTOP)
    try:
        yield
    finally:
        _signal(pids, signal.SIGCONT)


async def drain(
    bridges: Sequence[int],
    simulator: Sequence[int],
    lag: RegistryLag,
    backlog_s: float,
    others: Callable[[], dict[str, float]],
) -> Drain:
    """Pause `bridges` for `backlog_s` while `simulator` sends, then pause `simulator` and time the
    bridges storing the backlog (`others`: CPU seconds so far of the broker, PostgreSQL...)."""
    count = "SELECT count(*) FROM seen_messages"
    with _paused(simulator, now=False):
        with _paused(bridges):
            await asyncio.sleep(backlog_s)
            _signal(simulator, signal.SIGSTOP)  # nothing new from here; the bridges still paused
            start = last = int(await lag.scalar(count))
            t0 = time.monotonic()
            cpu0 = sum(proc_sample(pid).cpu_s for pid in bridges)
            others0 = others()
        # The bridges go on from here, on the backlog alone.
        t_last, cpu_last, others_last = t0, cpu0, others0
        still = 0
        while still < STILL_POLLS:
            await asyncio.sleep(POLL_S)
            now = int(await lag.scalar(count))
            if now == start and time.monotonic() - t0 < FIRST_COMMIT_S:
                continue  # nothing stored yet
            if now != last:
                last, still = now, 0
                t_last = time.monotonic()
                cpu_last = sum(proc_sample(pid).cpu_s for pid in bridges)
                others_last = others()
            else:
                still += 1
    return Drain(
        messages=last - start,
        seconds=t_last - t0,
        bridge_cpu_s=cpu_last - cpu0,
        other_cpu_s={k: v - others0.get(k, 0.0) for k, v in others_last.items()},
    )
