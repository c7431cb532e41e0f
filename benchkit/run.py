"""One fleet run at one size: its own broker, registry and `cloud-bridge run` processes, the
simulator (the `fleetsim` package) driving N devices at them, and what is watched meanwhile."""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchkit.drain import drain
from benchkit.outcome import SAMPLE_S, Outcome, pct
from benchkit.queries import time_queries
from benchkit.servers import BridgeSpec, write_bridge_config
from benchkit.watch import (
    BridgeLog,
    BrokerStore,
    ProcSample,
    RegistryLag,
    Series,
    proc_sample,
    run_queue_wait,
    tree_cpu,
)
from devservers import Mosquitto
from devservers.postgres import create_database
from fleetsim.options import BrokerOptions, Spec
from fleetsim.profile import Profile
from fleetsim.report import Snapshot
from fleetsim.runner import Fleet as Simulator

PER_SIM = 10_000  # devices per simulator process (~0.15 core at the default profile)
CONNECTIONS_PER_SIM = 4


class FleetRun:
    """Runs at one size after another, each with fresh servers."""

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

    def simulator(self, broker: Mosquitto, devices: int) -> Simulator:
        spec = Spec(
            broker=BrokerOptions(broker.host, broker.port),
            profile=self.profile,
            devices=devices,
            connections=CONNECTIONS_PER_SIM,
            report_s=SAMPLE_S,
        )
        return Simulator(spec, math.ceil(devices / PER_SIM))

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
        sim = self.simulator(broker, devices)
        try:
            first = await sim.start()
            t0 = time.time()
            start = [proc_sample(p.pid) for p in procs]
            broker_cpu0 = tree_cpu(broker.pid or 0)
            sim_cpu0 = sum(tree_cpu(pid) for pid in sim.pids)
            pg_cpu0 = self._pg_cpu()
            for log in logs:
                log.refresh()
            stored0 = sum(log.stored for log in logs)
            handled0 = [log.handled for log in logs]
            sim_runq0 = sum(run_queue_wait(pid) for pid in sim.pids)
            lags, stored = Series(), Series()
            snaps: list[Snapshot] = []
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
                snaps.append(sim.snapshot())
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
            sim_runq = sum(run_queue_wait(pid) for pid in sim.pids) - sim_runq0
            other = {
                "broker": tree_cpu(broker.pid or 0) - broker_cpu0,
                "simulator": sum(tree_cpu(pid) for pid in sim.pids) - sim_cpu0,
            }
            if self.pg is not None:
                other["postgresql"] = self._pg_cpu() - pg_cpu0
            last = snaps[-1] if snaps else first
            backlog = None
            for cycle in range(1, (args.drains if args.drain_s > 0 else 0) + 1):
                one = await drain([p.pid for p in procs], sim.pids, lag, args.drain_s, lambda: self._other_cpu(broker))
                print(f"[{label}] drain {cycle}:{one.line()}", flush=True)
                backlog = one if backlog is None else backlog + one
            final = await sim.stop()
            if backlog is None:  # after a drain, its answers' latencies include the pause
                snaps.append(final)
        finally:
            store.close()
            await sim.kill()
        for log in logs:
            log.refresh()
        size1 = await self._size(lag, db)
        queries = await time_queries(url) if args.queries else {}
        await lag.close()
        sent = dict(last.sent)
        total = sum(sent.values())
        latencies = [v for s in snaps for v in s.latencies_ms]
        asked = last["answered"] + last["timed_out"]
        cpu = [e.cpu_s - s.cpu_s for s, e in zip(start, end, strict=True)]
        outcome = Outcome(
            label=label,
            devices=devices,
            seconds=elapsed,
            sent=sent,
            msgs_per_s=total / elapsed,
            stored_per_s=stored_rate,
            bridge_cpu_us=[c / max(1, total) * 1e6 * len(cpu) for c in cpu],
            bridge_cpu_share=[c / elapsed for c in cpu],
            bridge_handled_us=[c / max(1, n) * 1e6 for c, n in zip(cpu, handled, strict=True)],
            bridge_runq_share=_runq_share(start, end, elapsed),
            other_cpu_us={k: v / max(1, total) * 1e6 for k, v in other.items()},
            lag_first=lags.thirds()[0],
            lag_last=lags.thirds()[1],
            lag_max=lags.max(),
            store_first=stored.thirds()[0],
            store_last=stored.thirds()[1],
            esc_sent=int(last["escalations"]),
            esc_in_time=last["answered"] / asked if asked else 1.0,
            esc_p50=pct(latencies, 0.5),
            esc_p99=pct(latencies, 0.99),
            sim_late_s=max((s.late_s for s in (snaps if backlog is not None else snaps[:-1])), default=0.0),
            sim_runq_share=sim_runq / elapsed / max(1, len(sim.pids)),
            sim_own_us=_own_us(snaps[0] if len(snaps) > 2 else first, last),
            confirmed=int(final["confirmed"]),
            unconfirmed=int(final["unconfirmed"]),
            growth_per_device_day=(size1 - size0) / devices * 86400 / elapsed,
            rss_per_device=sum(e.rss - b.rss for b, e in zip(before, end, strict=True)) / devices,
            queries=queries,
            lock_waits=lock_waits,
            drain=backlog,
        )
        outcome.judge(args.max_lag_s)
        return outcome

    def _other_cpu(self, broker: Mosquitto) -> dict[str, float]:
        cpu = {"broker": tree_cpu(broker.pid or 0)}
        if self.pg is not None:
            cpu["postgresql"] = self._pg_cpu()
        return cpu

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


def _own_us(base: Snapshot, last: Snapshot) -> float:
    """The simulator's CPU per message sent after `base` (its start-up, births included, before)."""
    return (last["cpu_s"] - base["cpu_s"]) / max(1, last.total_sent - base.total_sent) * 1e6


def _runq_share(start: list[ProcSample], end: list[ProcSample], elapsed: float) -> list[float]:
    return [(e.runq_s - s.runq_s) / elapsed for s, e in zip(start, end, strict=True)]
