"""The registry's fleet-wide queries and a rollout's per-device work at fleet size, before vs now.

For each engine (a SQLite file, and a private PostgreSQL from devservers/postgres.py) the bench fills
a registry with `--devices` devices' status and `--minutes` of telemetry windows every 10 s, written by
the bridge's own row-writing code (benchkit/queryfill.py), then times, side by side on the same rows:

- `cloud-bridge devices` (cli/devices.py `fleet_devices`, 300 s of telemetry): before, window
  functions over every recent window's JSON summary; now, sums per device in SQL from the covering
  index;
- the rollout judge's telemetry read (10 minutes, canary vs control): before, every window into Python
  (RolloutStore.telemetry + stages.split_groups); now, RolloutStore.group_stats;
- stage selection (the fleet's devices read, sorted by hash; unchanged);
- starting a 100% stage over every online device (the first deploy tick: selection, device rows,
  signed model_update commands recorded and published to a counting publish): before, one device at
  a time; now, RolloutDriver.tick;
- the ack refresh once every device acked: before, command_states by cmd_id and one update per
  device; now, one join and one executemany (RolloutDriver.refresh);
- `rollout status ID` of that rollout (cli/rollout.py's own functions).

Each figure is CPU seconds (this process, with aiosqlite's thread, plus the PostgreSQL server's
processes) and wall seconds; the machine may be shared, so CPU is the measure to compare. Read-only
queries are the median of `--rounds`; the rollout steps run once each way. The last line is the
headline: `ratio X old/new devices-query` (CPU, on the last engine run).

Run: `.venv/bin/python bench/queries.py --devices 10000` (fills take ~2 min per engine on a 2-core VM).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from sqlalchemy import case, func, insert, select, text  # noqa: E402

from benchkit.queryfill import FLEET, FillSpec, fill  # noqa: E402
from cloud_bridge.cli.devices import fleet_devices  # noqa: E402
from cloud_bridge.cli.rollout import _devices_with_acks  # noqa: E402
from cloud_bridge.config import RolloutConfig  # noqa: E402
from cloud_bridge.models.store import ModelRecord, ModelStore  # noqa: E402
from cloud_bridge.ota.commands import CommandSender, command_states  # noqa: E402
from cloud_bridge.ota.deltas import DeltaStore  # noqa: E402
from cloud_bridge.registry import CommandAckRow, Device, ModelRow, Registry, TelemetryRow  # noqa: E402
from cloud_bridge.rollout.driver import RolloutDriver  # noqa: E402
from cloud_bridge.rollout.stages import select_stage, split_groups  # noqa: E402
from cloud_bridge.rollout.store import NewRollout, RolloutStore  # noqa: E402
from devservers.postgres import create_database, postgres_installed, postgres_server  # noqa: E402
from schemas.msgid import new_msg_id  # noqa: E402
from schemas.signing import generate_private_key  # noqa: E402
from schemas.topics import Topics  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
TARGET = ModelRecord(
    "digits-edge", "2.0.0", "cd" * 32, 200_000, Path("unused.onnx"), tuple("0123456789"), (1, 64), {}, 0.0
)


# ---- CPU accounting --------------------------------------------------------------------------------
def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the command name (state first)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _proc_cpu(pid: int | str) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / TICKS


class Cpu:
    """CPU seconds of this process plus, for PostgreSQL, every process of its server."""

    def __init__(self) -> None:
        self.postmaster: int | None = None

    async def attach(self, registry: Registry) -> None:
        if registry.engine.dialect.name == "postgresql":
            async with registry.engine.connect() as conn:
                backend = int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
            self.postmaster = int(_stat(backend)[1])  # the backend's parent

    def now(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        total = usage.ru_utime + usage.ru_stime
        if self.postmaster is not None:
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    if int(entry.name) == self.postmaster or int(_stat(entry.name)[1]) == self.postmaster:
                        total += _proc_cpu(entry.name)
                except (OSError, ValueError, IndexError):
                    continue  # a process that ended meanwhile
        return total


@dataclass
class Timing:
    cpu: float
    wall: float


async def timed(cpu: Cpu, call: Callable[[], Awaitable[Any]], rounds: int = 1) -> Timing:
    cpus, walls = [], []
    for _ in range(rounds):
        c, w = cpu.now(), time.perf_counter()
        await call()
        walls.append(time.perf_counter() - w)
        cpus.append(cpu.now() - c)
    return Timing(statistics.median(cpus), statistics.median(walls))


# ---- the previous release's ways ---------------------------------------------------------------------
async def devices_before(registry: Registry, now: float, recent_s: float) -> int:
    """`cloud-bridge devices` as the previous release ran it: window functions over every recent
    window, the numbers read from each row's JSON summary (or body)."""
    d, t = Device.__table__, TelemetryRow.__table__

    def field(*path: str) -> Any:
        return case((t.c.summary.is_(None), t.c.body[path].as_integer()), else_=t.c.summary[path].as_integer())

    device = [t.c.fleet_id, t.c.device_id]
    ranked = (
        select(
            t.c.fleet_id,
            t.c.device_id,
            func.sum(t.c.count).over(partition_by=device).label("inputs"),
            func.sum(field("escalations", "sent")).over(partition_by=device).label("escalated"),
            func.sum(t.c.window_end - t.c.window_start).over(partition_by=device).label("span"),
            field("outbox", "depth").label("outbox_depth"),
            func.row_number().over(partition_by=device, order_by=t.c.window_end.desc()).label("rank"),
        )
        .where(t.c.window_end >= now - recent_s)
        .subquery()
    )
    recent = select(ranked).where(ranked.c.rank == 1).subquery()
    query = (
        select(d.c.device_id, d.c.online, recent.c.inputs, recent.c.escalated, recent.c.span, recent.c.outbox_depth)
        .select_from(d)
        .outerjoin(recent, (recent.c.fleet_id == d.c.fleet_id) & (recent.c.device_id == d.c.device_id))
        .order_by(d.c.fleet_id, d.c.device_id)
    )
    async with registry.engine.connect() as conn:
        return len((await conn.execute(query)).all())


async def deploy_before(store: RolloutStore, sender: CommandSender, models: ModelStore, rid: str) -> None:
    """The first deploy tick of a stage as the previous release ran it: per device, the model looked
    up, the command sent (device_model, record, publish) and the row updated, one after another."""
    rollout = await store.get(rid)
    assert rollout is not None
    fleet = await store.fleet(FLEET)
    picked = select_stage(rid, fleet, set(), rollout["model_sha256"], 100)
    await store.add_devices(rid, FLEET, 0, picked)
    for row in await store.devices(rid):
        record = await models.get(rollout["model_name"], rollout["model_version"])
        command = await sender.send_update(FLEET, row["device_id"], record, rollout_id=rid, stage=0)
        await store.update_device(rid, row["device_id"], cmd_id=command.cmd_id, state="sent")


async def refresh_before(store: RolloutStore, rid: str) -> None:
    """The ack refresh as the previous release ran it: states by cmd_id, then one update per device."""
    waiting = {d["cmd_id"]: d for d in await store.devices(rid) if d["cmd_id"] is not None}
    for state in await command_states(store.registry, cmd_ids=list(waiting)):
        row = waiting[state.cmd_id]
        if state.state is not None and state.state != row["state"]:
            await store.update_device(rid, row["device_id"], state=state.state, reason=state.reason)


# ---- one engine ------------------------------------------------------------------------------------
class CountingPublish:
    def __init__(self) -> None:
        self.count = 0

    async def __call__(self, topic: str, payload: bytes, qos: int, expiry: int | None) -> None:
        self.count += 1


async def ack_all(registry: Registry, store: RolloutStore, rid: str) -> None:
    now = time.time()
    rows = [
        {"msg_id": new_msg_id(), "fleet_id": FLEET, "device_id": d["device_id"], "cmd_id": d["cmd_id"],
         "state": state, "reason": None, "ts": now + n}
        for d in await store.devices(rid)
        for n, state in enumerate(("received", "done"))
    ]  # fmt: skip
    async with registry.engine.begin() as conn:
        await conn.execute(insert(CommandAckRow), rows)


async def run_engine(name: str, url: str, spec: FillSpec, rounds: int, work: Path) -> dict[str, tuple[Timing, Timing]]:
    registry = Registry(url)
    await registry.create()
    cpu = Cpu()
    await cpu.attach(registry)
    try:
        now = time.time()
        started = time.perf_counter()
        messages = await fill(registry, spec, now)
        print(f"{name}: filled {messages} messages in {time.perf_counter() - started:.0f} s", flush=True)
        if registry.engine.dialect.name == "postgresql":
            async with registry.engine.begin() as conn:
                await conn.execute(text("ANALYZE"))  # what autovacuum's analyze would have done by now
        async with registry.engine.begin() as conn:
            await conn.execute(
                insert(ModelRow).values(
                    name=TARGET.name, version=TARGET.version, sha256=TARGET.sha256, size=TARGET.size,
                    path=str(work / "unused.onnx"), labels=list(TARGET.labels), input_shape=list(TARGET.input_shape),
                    reference_mix={}, added_at=now,
                )
            )  # fmt: skip
        store = RolloutStore(registry)
        models = ModelStore(work / f"models-{name}", registry)
        publish = CountingPublish()
        sender = CommandSender(
            Topics(), generate_private_key(), None, publish, registry=registry, models=models, deltas=DeltaStore(models)
        )
        out: dict[str, tuple[Timing, Timing]] = {}

        out["devices"] = (
            await timed(cpu, lambda: devices_before(registry, now, 300.0), rounds),
            await timed(cpu, lambda: fleet_devices(registry, now, 300.0), rounds),
        )
        judged = {
            "id": "none", "fleet_id": FLEET, "model_name": TARGET.name, "model_version": TARGET.version,
            "watch_from": now - 300.0, "stage_started_at": now - 300.0, "window_s": 300.0,
        }  # fmt: skip

        async def judge_before() -> None:
            split_groups(await store.telemetry(FLEET, now - 600.0), judged, set())

        out["judge read (10 min)"] = (
            await timed(cpu, judge_before, rounds),
            await timed(cpu, lambda: store.group_stats(judged), rounds),
        )

        async def selection() -> None:
            select_stage("r", await store.fleet(FLEET), set(), TARGET.sha256, 100)

        same = await timed(cpu, selection, rounds)
        out["stage selection (same code)"] = (same, same)

        new = NewRollout(FLEET, await models.get(TARGET.name, TARGET.version), (100,), 600.0, {})
        before_id = await store.create(new)
        start_before = await timed(cpu, lambda: deploy_before(store, sender, models, before_id))
        await store.abort(before_id, "bench", rollback=False)
        now_id = await store.create(new)
        driver = RolloutDriver(registry, models, sender, RolloutConfig(), "bench")
        start_now = await timed(cpu, driver.tick)
        assert driver.errors == 0, "the new deploy failed: see the log"
        out["rollout start (100% stage)"] = (start_before, start_now)
        await ack_all(registry, store, before_id)
        await ack_all(registry, store, now_id)
        refresh_now = await timed(cpu, lambda: _refresh_now(driver, store, now_id))
        out["ack refresh"] = (await timed(cpu, lambda: refresh_before(store, before_id)), refresh_now)

        async def status() -> None:
            await store.get(now_id)
            await _devices_with_acks(store, registry, now_id)

        shown = await timed(cpu, status, rounds)
        out["rollout status ID (same code)"] = (shown, shown)
        print(f"{name}: {publish.count} commands published (counted, no broker)", flush=True)
        return out
    finally:
        await registry.close()


async def _refresh_now(driver: RolloutDriver, store: RolloutStore, rid: str) -> None:
    await driver.refresh(rid, await store.devices(rid))


def report(name: str, results: dict[str, tuple[Timing, Timing]]) -> None:
    print(f"\n{name}: {'query':<32} {'before cpu/wall s':>20} {'now cpu/wall s':>18} {'cpu ratio':>10}")
    for what, (before, now) in results.items():
        ratio = before.cpu / now.cpu if now.cpu > 0 else float("inf")
        figures = f"{before.cpu:>9.3f} / {before.wall:<8.3f} {now.cpu:>7.3f} / {now.wall:<8.3f}"
        print(f"{name}: {what:<32} {figures} {ratio:>8.1f}x")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--minutes", type=float, default=10.0, help="telemetry kept per device (10 s windows)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each read-only query (median)")
    parser.add_argument("--engines", default="sqlite,postgresql")
    args = parser.parse_args()
    spec = FillSpec(args.devices, args.minutes)
    print(f"{args.devices} devices, {args.minutes:g} min of telemetry; load average {os.getloadavg()[0]:.1f}")
    headline: tuple[str, float] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-queries-") as tmp:
        work = Path(tmp)
        for engine in args.engines.split(","):
            if engine == "sqlite":
                results = await run_engine(
                    "sqlite", f"sqlite+aiosqlite:///{work / 'registry.db'}", spec, args.rounds, work
                )
            elif engine == "postgresql":
                if not postgres_installed():
                    print("postgresql: skipped (server binaries not installed)")
                    continue
                with postgres_server() as port:
                    url = create_database(port, "registry")
                    results = await run_engine("postgresql", url, spec, args.rounds, work)
            else:
                raise SystemExit(f"--engines: unknown engine {engine!r} (sqlite, postgresql)")
            report(engine, results)
            before, now = results["devices"]
            headline = (engine, before.cpu / now.cpu)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    if headline is not None:
        print(f"ratio {headline[1]:.1f} old/new devices-query ({headline[0]})")


if __name__ == "__main__":
    asyncio.run(main())
