"""Fleet scale: how many simulated devices one bridge holds, and what two bridges on PostgreSQL give.

A run starts its own Mosquitto (queue limits raised, docs/traps.md #1; autosave every 10 s as
mosquitto/cloud.conf ships; `$SYS` every 2 s), the demo
cloud model, real `cloud-bridge run` processes and the simulator (the `fleetsim` package, also a
command: `python -m fleetsim --help`): N devices (ids sim-000000...) over a handful of MQTT 5
connections per process, speaking schemas/ in the compact encoding
(status birth retained, result/2 coalesced for up to 10 s as the edge does by default, samples at its
default budget of 3 a minute, telemetry windows every 10 s with per-device
class mixes and feature profiles, 5% escalations awaiting the cloud's answer, uncertain samples within
budget, command acks, delivery confirmations counted; drift injected into 1% of devices after 30 s).
Every message carries its scheduled time, so the lag includes the simulator's own lateness. Per run
it prints:

- messages/s by type (what the simulator sent) and the bridge's CPU µs per message sent and per
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
  >= 99% of escalations answered in time, and the simulator kept its schedule (within 1 s); the
  line names each condition that failed.

`--devices 1000,2000,5000,10000` tries each (one bridge, SQLite registry unless `--postgres`) and ends
with the sizes not held and why, then `devices held by one bridge: N` (the largest held). `--scale N`
runs one bridge and then two on `$share` with the registry on PostgreSQL, both at N devices; after each
run's live phase it pauses the bridges for `--drain-s` seconds while the fleet sends, pauses the fleet
and times the bridges on that backlog, `--drains` times, summed (benchkit/drain.py). It prints CPU per message at the
live load and on the backlog, two over one, and ends with `ratio X two-bridges/one-bridge (postgresql)`:
throughput on the same backlog. On a 2-core machine the broker, the simulator, PostgreSQL and the bridges
share the cores: every process's CPU per message is printed so the figures can be judged fairly.

Run: `.venv/bin/python bench/fleet.py --devices 2000 --seconds 120`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
from pathlib import Path

# The repository's own packages first (also for the simulator's worker processes).
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))

from benchkit.outcome import print_outcome  # noqa: E402
from benchkit.run import FleetRun  # noqa: E402
from benchkit.servers import cloud_model, postgres  # noqa: E402


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
            fleet = FleetRun(args, work, model, pg)
            held, why = 0, []
            for n in args.devices:
                outcome = await fleet.run(f"n{n}", n, 1)
                print_outcome(outcome)
                if outcome.held:
                    held = max(held, n)
                else:
                    why.append(f"{n}: {outcome.why}")
                    if not args.keep_going:
                        break
        engine = "postgresql" if args.postgres else "sqlite"
        tried = ", ".join(f"{n:,}" for n in args.devices)
        print(f"sizes tried: {tried}; " + ("not held at " + " | ".join(why) if why else "every size held"))
        print(f"devices held by one bridge: {held} ({engine} registry, {args.seconds:g} s per size)")


async def scale(args: argparse.Namespace, work: Path, model: Path) -> None:
    # A PostgreSQL server of its own for each run: the first run's checkpoints and autovacuum would
    # otherwise land in the second's CPU figures.
    with postgres() as pg:
        one = await FleetRun(args, work, model, pg).run("one", args.scale, 1)
    print_outcome(one)
    with postgres() as pg:
        two = await FleetRun(args, work, model, pg).run("two", args.scale, 2)
    print_outcome(two)
    # Live: CPU per message each bridge handled (stored, duplicate, escalation), averaged over the
    # bridges; per message *sent* would favour whichever run fell further behind. At an offered load
    # both keep up with, two bridges commit batches half the size: a light-load figure, not the target.
    cpu1 = sum(one.bridge_handled_us) / len(one.bridge_handled_us)
    cpu2 = sum(two.bridge_handled_us) / len(two.bridge_handled_us)
    lags = f"lag last third {one.lag_last:.2f} s vs {two.lag_last:.2f} s"
    print(f"live load: CPU per message handled two {cpu2:.0f} us / one {cpu1:.0f} us = {cpu2 / cpu1:.2f}; {lags}")
    assert one.drain is not None and two.drain is not None
    d1, d2 = one.drain, two.drain
    print(
        f"same backlog: CPU per message stored, bridges together: two {d2.bridge_us:.0f} us / one "
        f"{d1.bridge_us:.0f} us = {d2.bridge_us / d1.bridge_us:.2f} (target <= 1.15 where the machine is the limit)"
    )
    print(
        f"same backlog: throughput two {d2.rate:.0f} / one {d1.rate:.0f} msgs/s "
        f"(target >= 1.7 where the cores allow; {os.cpu_count()} CPUs here, shared with the broker and PostgreSQL)"
    )
    print(f"ratio {d2.rate / d1.rate:.2f} two-bridges/one-bridge (postgresql)")


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
        "--drain-s",
        type=float,
        default=None,
        help="after each run, pause the bridges this long (<= 40 s, their keepalive) and time them on the "
        "backlog (default 20 with --scale, else off)",
    )
    parser.add_argument(
        "--drains",
        type=int,
        default=2,
        help="pause-and-drain cycles per run, summed (each bridge's confirmations go out in bursts every "
        "20 s: more cycles, less of a run's figure is where the bursts fell)",
    )
    parser.add_argument(
        "--model-cache", default=str(Path(tempfile.gettempdir()) / "edgefleet-bench-models"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.drain_s is None:
        args.drain_s = 20.0 if args.scale else 0.0
    if args.drains < 1:
        parser.error(f"--drains {args.drains}: at least 1")
    if not 0 <= args.drain_s <= 40:
        parser.error(f"--drain-s {args.drain_s:g}: between 0 and 40 s (the bridges' keepalive is 30 s)")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
