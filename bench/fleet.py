"""Fleet scale: how many simulated devices one bridge holds, and what two bridges on PostgreSQL give.

A run starts its own Mosquitto (queue limits raised, docs/traps.md #1; autosave every 10 s as
mosquitto/cloud.conf ships; `$SYS` every 2 s), the demo
cloud model, real `cloud-bridge run` processes and simulator processes (bench/fleetsim/): N devices
(ids sim-000000...) over a handful of MQTT 5 connections, speaking schemas/ in the compact encoding
(status birth retained, result/2 coalesced for up to 10 s as the edge does by default, samples at its
default budget of 3 a minute, telemetry windows every 10 s with per-device
class mixes and feature profiles, 5% escalations awaiting the cloud's answer, uncertain samples within
budget, command acks; drift injected into 1% of devices after 30 s). Per run it prints:

- messages/s by type (what the simulators sent) and the bridge's CPU µs per message sent and per
  message it handled (stored, duplicate, escalation answered or expired), with the share of the run
  each process spent runnable but waiting for a CPU (Linux schedstat): a bridge that looks idle may
  be waiting for a core the simulator, the broker and other jobs hold;
- end-to-end lag: device time of a message -> the bridge taking it into a committed batch (median of
  the newest 300 registry rows, sampled every 5 s), first and last third of the run;
- escalation answer latency p50/p99 (request sent -> reply received, at the simulator) and the share
  answered within the device's 2 s timeout;
- registry growth per device-day, bridge RSS per device (over the bridge's RSS before the fleet came);
- the time of `cloud-bridge devices` / `alerts` / `rollout status` queries at that size;
- the verdict: held = lag's last third below `--max-lag-s` and not growing, broker store not growing,
  >= 99% of escalations answered in time, and the simulators kept their schedule.

`--devices 1000,2000,5000,10000` tries each (one bridge, SQLite registry unless `--postgres`) and ends
with `devices held by one bridge: N` (the largest held). `--scale N` runs one bridge and then two on
`$share` with the registry on PostgreSQL, both at N devices, and ends with
`ratio X two-bridges/one-bridge (postgresql)` (throughput at the same offered load, and CPU per
message side by side). On a 2-core machine the broker, the simulator, PostgreSQL and the bridges
share the cores: every process's CPU per message is printed so the figures can be judged fairly.

Run: `.venv/bin/python bench/fleet.py --devices 2000 --seconds 120`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The repository's own packages first (also for the child processes), then bench/fleetsim.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))

from fleetsim.device import Profile  # noqa: E402
from fleetsim.queries import time_queries  # noqa: E402
from fleetsim.servers import BridgeSpec, cloud_model, postgres, write_bridge_config  # noqa: E402
from fleetsim.sim import child_main  # noqa: E402
from fleetsim.watch import (  # noqa: E402
    BridgeLog,
    BrokerStore,
    RegistryLag,
    Series,
    proc_sample,
    run_queue_wait,
    tree_cpu,
)

from devservers import Mosquitto  # noqa: E402
from devservers.postgres import create_database  # noqa: E402

SAMPLE_S = 5.0
PER_SIM = 5000  # devices per simulator process
CONNECTIONS_PER_SIM = 4


@dataclass
class Outcome:
    label: str
    devices: int
    seconds: float
    sent: dict[str, int]
    msgs_per_s: float
    stored_per_s: float
    bridge_cpu_us: list[float]
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
    growth_per_device_day: float
    rss_per_device: float
    queries: dict[str, float] = field(default_factory=dict)
    lock_waits: int = 0  # PostgreSQL: backends waiting on a lock, summed over the 5 s samples
    held: bool = False
    why: str = ""


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Fleet:
    """One run: broker, registry, bridges and simulators at one size."""

    def __init__(self, args: argparse.Namespace, work: Path, model: Path, pg: tuple[str, int] | None) -> None:
        self.args, self.work, self.model, self.pg = args, work, model, pg
        self.profile = Profile(
            escalate_share=args.escalations, drift_share=args.drift_share, escalation_timeout_s=args.timeout
        )

    def registry(self, label: str) -> tuple[str, Path | None]:
        if self.pg is None:
            db = self.work / label / "registry.db"
            db.parent.mkdir(parents=True, exist_ok=True)
            return f"sqlite+aiosqlite:///{db}", db
        _, port = self.pg
        return create_database(port, label.replace("-", "_")), None

    async def run(self, label: str, devices: int, bridges: int) -> Outcome:
        run_dir = self.work / label
        run_dir.mkdir(parents=True, exist_ok=True)
        url, db = self.registry(label)
        # As mosquitto/cloud.conf ships: autosave every 10 s. Each autosave writes the whole in-memory
        # database (retained statuses, every queued message) and blocks the broker meanwhile: at 10,000
        # devices with a backlog, the 1 s of the test default stalled delivery for seconds at a time.
        with Mosquitto(
            run_dir / "broker", max_inflight_messages=1000, autosave_interval_s=10, extra_conf="sys_interval 2"
        ) as broker:
            specs = [BridgeSpec(f"{label}-b{i}", url) for i in range(bridges)]
            configs = [write_bridge_config(run_dir, s, broker, self.model, None) for s in specs]
            procs, logs = [], []
            for spec, cfg in zip(specs, configs, strict=True):
                log_path = run_dir / f"{spec.name}.log"
                logs.append(BridgeLog(log_path))
                procs.append(
                    subprocess.Popen(  # noqa: ASYNC220 - started once per run, before anything is measured
                        [sys.executable, "-m", "cloud_bridge.cli", "run", "--config", str(cfg)],
                        stdout=subprocess.DEVNULL,
                        stderr=log_path.open("w"),
                    )
                )
            try:
                await self._wait_logged(logs, "mqtt connected", procs)
                return await self._drive(label, devices, broker, procs, logs, url, db)
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                for p in procs:
                    try:
                        p.wait(60)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
                if broker.dropped_messages_logged():
                    raise RuntimeError(f"broker dropped queued messages (docs/traps.md #1): {broker.log_path}")

    async def _wait_logged(self, logs: list[BridgeLog], needle: str, procs: list[subprocess.Popen[bytes]]) -> None:
        deadline = time.monotonic() + 120
        while not all(needle in log.path.read_text(errors="replace") for log in logs):
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a bridge exited at start: see {[str(lg.path) for lg in logs]}")
            if time.monotonic() > deadline:
                raise RuntimeError("bridges not connected within 120 s")
            await asyncio.sleep(0.2)

    async def _drive(
        self,
        label: str,
        devices: int,
        broker: Mosquitto,
        procs: list[subprocess.Popen[bytes]],
        logs: list[BridgeLog],
        url: str,
        db: Path | None,
    ) -> Outcome:
        args = self.args
        lag = RegistryLag(url)
        store = BrokerStore(broker.host, broker.port)
        before = [proc_sample(p.pid) for p in procs]
        size0 = await self._size(lag, db)
        sims = await self._start_sims(broker, devices)
        try:
            t0 = time.time()
            start = [proc_sample(p.pid) for p in procs]
            broker_cpu0 = tree_cpu(broker.pid or 0)
            sim_cpu0 = sum(tree_cpu(s.pid) for s in sims)
            pg_cpu0 = self._pg_cpu()
            for log in logs:
                log.refresh()
            stored0 = sum(log.stored for log in logs)
            handled0 = [log.handled for log in logs]
            sim_runq0 = sum(run_queue_wait(s.pid) for s in sims)
            lags, stored = Series(), Series()
            lines: list[dict[str, Any]] = []
            lock_waits = 0
            while time.time() - t0 < args.seconds:
                await asyncio.sleep(SAMPLE_S)
                value = await lag.sample()
                if value is not None:
                    lags.add(time.time() - t0, value)
                if store.count is not None:
                    stored.add(time.time() - t0, store.count)
                if self.pg is not None:
                    lock_waits += int(await lag.scalar("SELECT count(*) FROM pg_locks WHERE NOT granted"))
                for s in sims:
                    lines.extend(await self._drain_lines(s))
                for p, log in zip(procs, logs, strict=True):
                    if p.poll() is not None:
                        tail = log.path.read_text(errors="replace")[-3000:]
                        raise RuntimeError(f"{label}: a bridge exited during the run; its log ends:\n{tail}")
            elapsed = time.time() - t0
            end = [proc_sample(p.pid) for p in procs]
            for log in logs:
                log.refresh()
            stored_rate = (sum(log.stored for log in logs) - stored0) / elapsed
            handled = [log.handled - h0 for log, h0 in zip(logs, handled0, strict=True)]
            sim_runq = sum(run_queue_wait(s.pid) for s in sims) - sim_runq0
            other = {
                "broker": tree_cpu(broker.pid or 0) - broker_cpu0,
                "simulators": sum(tree_cpu(s.pid) for s in sims) - sim_cpu0,
            }
            if self.pg is not None:
                other["postgresql"] = self._pg_cpu() - pg_cpu0
            finals = await self._stop_sims(sims)
        finally:
            store.close()
            for s in sims:
                if s.returncode is None:
                    s.kill()
        for log in logs:
            log.refresh()
        size1 = await self._size(lag, db)
        queries = await time_queries(url) if args.queries else {}
        await lag.close()
        outcome = self._outcome(
            label, devices, elapsed, lines, finals, before, start, end, other, lags, stored, size1 - size0, queries
        )
        outcome.stored_per_s = stored_rate
        outcome.lock_waits = lock_waits
        outcome.bridge_handled_us = [
            (e.cpu_s - b.cpu_s) / max(1, n) * 1e6 for b, e, n in zip(start, end, handled, strict=True)
        ]
        outcome.sim_runq_share = sim_runq / elapsed / max(1, len(sims))
        return outcome

    def _pg_cpu(self) -> float:
        if self.pg is None:
            return 0.0
        import psutil

        total = 0.0
        for p in psutil.process_iter(["name", "cmdline"]):
            try:
                if p.info["name"] == "postgres" and str(self.pg[1]) in " ".join(p.info["cmdline"] or []):
                    total += tree_cpu(p.pid)
            except psutil.NoSuchProcess:
                continue
        return total

    async def _size(self, lag: RegistryLag, db: Path | None) -> float:
        if db is not None:
            return float(sum(p.stat().st_size for p in db.parent.glob(db.name + "*")))
        return float(await lag.scalar("SELECT pg_database_size(current_database())"))

    async def _start_sims(self, broker: Mosquitto, devices: int) -> list[asyncio.subprocess.Process]:
        sims = []
        procs = max(1, math.ceil(devices / PER_SIM))
        for i in range(procs):
            first = i * devices // procs
            count = (i + 1) * devices // procs - first
            spec = {
                "host": broker.host,
                "port": broker.port,
                "prefix": "fleet",
                "fleet": "sim",
                "first": first,
                "devices": count,
                "connections": CONNECTIONS_PER_SIM,
                "seed": i,
                "report_s": SAMPLE_S,
                "profile": asdict(self.profile),
            }
            sims.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--child-sim",
                    json.dumps(spec),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    limit=1 << 26,
                )
            )
        for s in sims:
            assert s.stdout is not None
            line = await asyncio.wait_for(s.stdout.readline(), 120)
            if not line or not json.loads(line).get("ready"):
                raise RuntimeError(f"a simulator did not start: {line!r}")
        return sims

    async def _drain_lines(self, sim: asyncio.subprocess.Process) -> list[dict[str, Any]]:
        out = []
        assert sim.stdout is not None
        while True:
            try:
                line = await asyncio.wait_for(sim.stdout.readline(), 0.01)
            except TimeoutError:
                break
            if not line:
                break
            out.append(json.loads(line))
        return out

    async def _stop_sims(self, sims: list[asyncio.subprocess.Process]) -> list[dict[str, Any]]:
        finals = []
        for s in sims:
            assert s.stdin is not None
            s.stdin.write(b"stop\n")
            await s.stdin.drain()
        for s in sims:
            assert s.stdout is not None
            while True:
                line = await asyncio.wait_for(s.stdout.readline(), 120)
                if not line:
                    raise RuntimeError("a simulator exited without its final report")
                data = json.loads(line)
                if data.get("final"):
                    finals.append(data)
                    break
            await s.wait()
        return finals

    def _outcome(
        self,
        label: str,
        devices: int,
        elapsed: float,
        lines: list[dict[str, Any]],
        finals: list[dict[str, Any]],
        before: list[Any],
        start: list[Any],
        end: list[Any],
        other: dict[str, float],
        lags: Series,
        stored: Series,
        growth: float,
        queries: dict[str, float],
    ) -> Outcome:
        # Counters at the last report inside the run (the final report adds the shutdown statuses).
        last: dict[int, dict[str, Any]] = {}
        latencies: list[float] = []
        late = 0.0
        for line in lines:
            latencies.extend(line["latencies_ms"])
            late = max(late, line["tick_late_s"])
        per_sim = [ln for ln in lines]
        for i, ln in enumerate(per_sim):
            last[i % max(1, len(finals))] = ln
        sent: dict[str, int] = {}
        esc = answered = timed_out = 0
        for f in finals:
            for k, v in f["sent"].items():
                sent[k] = sent.get(k, 0) + v
            esc += f["escalations"]
            answered += f["answered"]
            timed_out += f["timed_out"]
            latencies.extend(f["latencies_ms"])
        ingest = sum(v for k, v in sent.items() if k != "escalate")
        total = sum(sent.values())
        cpu = [e.cpu_s - s.cpu_s for s, e in zip(start, end, strict=True)]
        bridge_us = [c / max(1, total) * 1e6 * len(cpu) for c in cpu]
        rss = sum(e.rss - b.rss for b, e in zip(before, end, strict=True))
        lag_first, lag_last = lags.thirds()
        store_first, store_last = stored.thirds()
        in_time = answered / max(1, esc)
        outcome = Outcome(
            label=label,
            devices=devices,
            seconds=elapsed,
            sent=sent,
            msgs_per_s=total / elapsed,
            stored_per_s=0.0,
            bridge_cpu_us=bridge_us,
            bridge_cpu_share=[c / elapsed for c in cpu],
            bridge_handled_us=[],
            bridge_runq_share=[(e.runq_s - s.runq_s) / elapsed for s, e in zip(start, end, strict=True)],
            other_cpu_us={k: v / max(1, total) * 1e6 for k, v in other.items()},
            lag_first=lag_first,
            lag_last=lag_last,
            lag_max=lags.max(),
            store_first=store_first,
            store_last=store_last,
            esc_sent=esc,
            esc_in_time=in_time,
            esc_p50=pct(latencies, 0.5),
            esc_p99=pct(latencies, 0.99),
            sim_late_s=late,
            sim_runq_share=0.0,
            growth_per_device_day=growth / devices * 86400 / elapsed,
            rss_per_device=rss / devices,
            queries=queries,
        )
        reasons = []
        if lag_last > self.args.max_lag_s:
            reasons.append(f"lag {lag_last:.1f} s > {self.args.max_lag_s:g} s")
        if lag_last > lag_first + 2.0:
            reasons.append(f"lag growing {lag_first:.1f} -> {lag_last:.1f} s")
        if store_last > store_first + max(2000, 0.05 * ingest / elapsed * SAMPLE_S):
            reasons.append(f"broker store growing {store_first:.0f} -> {store_last:.0f}")
        if in_time < 0.99:
            reasons.append(f"escalations answered in time {in_time:.1%}")
        if late > 1.0:
            reasons.append(f"simulator behind its schedule by {late:.1f} s (the machine, not the bridge)")
        outcome.held = not reasons
        outcome.why = "; ".join(reasons) or "held"
        del ingest
        return outcome


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
    others += f" (simulators waited for a CPU {o.sim_runq_share:.0%} of the time each)"
    if "postgresql" in o.other_cpu_us:
        others += f"; lock waits seen {o.lock_waits} (samples every {SAMPLE_S:g} s)"
    print(f"  CPU per message: bridge(s) {cpu}; {others}")
    print(
        f"  lag device->stored: first third {o.lag_first:.2f} s, last third {o.lag_last:.2f} s, max {o.lag_max:.2f} s;"
        f" broker store {o.store_first:.0f} -> {o.store_last:.0f}"
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
    print(f"  verdict: {'HELD' if o.held else 'not held'} ({o.why})", flush=True)


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = cloud_model(Path(args.model_cache))
        if args.scale:
            await scale(args, work, model)
            return
        stack = contextlib.ExitStack()
        pg = stack.enter_context(postgres()) if args.postgres else None
        with stack:
            fleet = Fleet(args, work, model, pg)
            held = 0
            for n in args.devices:
                outcome = await fleet.run(f"n{n}", n, 1)
                print_outcome(outcome)
                if outcome.held:
                    held = max(held, n)
                elif not args.keep_going:
                    break
        engine = "postgresql" if args.postgres else "sqlite"
        print(f"devices held by one bridge: {held} ({engine} registry, {args.seconds:g} s per size)")


async def scale(args: argparse.Namespace, work: Path, model: Path) -> None:
    with postgres() as pg:
        fleet = Fleet(args, work, model, pg)
        one = await fleet.run("one", args.scale, 1)
        print_outcome(one)
        two = await fleet.run("two", args.scale, 2)
        print_outcome(two)
    # CPU per message each bridge handled (stored, duplicate, escalation), averaged over the bridges:
    # per message *sent* would favour whichever run fell further behind.
    cpu1 = sum(one.bridge_handled_us) / len(one.bridge_handled_us)
    cpu2 = sum(two.bridge_handled_us) / len(two.bridge_handled_us)
    lags = f"lag last third {one.lag_last:.2f} s vs {two.lag_last:.2f} s"
    print(f"CPU per message handled: two {cpu2:.0f} us / one {cpu1:.0f} us = {cpu2 / cpu1:.2f}; {lags}")
    print(f"ratio {two.stored_per_s / one.stored_per_s:.2f} two-bridges/one-bridge (postgresql)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--devices",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1000, 2000, 5000, 10000],
        help="fleet sizes to try in turn, comma-separated (default 1000,2000,5000,10000)",
    )
    parser.add_argument("--seconds", type=float, default=120.0, help="how long each size runs (default 120)")
    parser.add_argument("--escalations", type=float, default=0.05, help="share of inferences escalated (0.05)")
    parser.add_argument("--drift-share", type=float, default=0.01, help="share of devices whose inputs drift")
    parser.add_argument("--timeout", type=float, default=2.0, help="the devices' escalation timeout in s (2.0)")
    parser.add_argument("--max-lag-s", type=float, default=5.0, help="lag above this is not held (5 s)")
    parser.add_argument("--postgres", action="store_true", help="the registry on a private PostgreSQL")
    parser.add_argument("--keep-going", action="store_true", help="try the next size after one not held")
    parser.add_argument("--no-queries", dest="queries", action="store_false", help="skip the CLI query timings")
    parser.add_argument("--workdir", help="keep the run's files (bridge logs, registries, broker log) here")
    parser.add_argument("--scale", type=int, default=0, metavar="N", help="one vs two bridges on PostgreSQL at N")
    parser.add_argument(
        "--model-cache", default=str(Path(tempfile.gettempdir()) / "edgefleet-bench-models"), help=argparse.SUPPRESS
    )
    parser.add_argument("--child-sim", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_sim:
        child_main(args.child_sim)
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
