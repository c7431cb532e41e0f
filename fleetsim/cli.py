"""`python -m fleetsim`: offer a simulated fleet's traffic to your own broker and cloud bridges.

N devices (ids sim-000000...; `--first` and `--device-format` to run disjoint ranges from several
machines) speak the wire contract of schemas/ in the compact encoding over a few MQTT 5 connections,
at the profile's rates; every `--report-s` a line says what went out, how the escalations fared
(sent -> answered, at the simulator), what the bridges confirmed stored (confirm/1, the devices'
own receipts) and how far the simulator is behind its schedule. At the end (after up to
`--drain-s` for the last confirmations) a summary and a verdict (with `--json`, also the final counts
as one JSON line): the cloud side kept up when
>= 99% of escalations were answered within the devices' timeout, no message stayed unconfirmed
longer than `--max-unconfirmed-s`, the broker refused nothing and nothing undecodable came back.
Exit status 0 when it kept up, 1 when not, 2 for an unusable option or a broker or bridge that is
not there. The password comes from `--password-file` or the environment variable
`--password-env` names (FLEETSIM_PASSWORD), never the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

from fleetsim import __version__
from fleetsim.options import BrokerOptions, OptionsError, Spec
from fleetsim.profile import Profile
from fleetsim.report import Run, Snapshot, pct
from fleetsim.runner import Fleet, SimulatorError
from schemas.errors import TopicError
from schemas.topics import validate_id

DEVICES_PER_PROCESS = 10_000


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fleetsim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"fleetsim {__version__}")
    b = p.add_argument_group("broker")
    b.add_argument("--host", default="127.0.0.1", help="broker host (127.0.0.1)")
    b.add_argument("--port", type=int, default=None, help="broker port (1883, or 8883 with TLS)")
    b.add_argument("--tls", action="store_true", help="connect with TLS (the system's CAs unless --ca)")
    b.add_argument("--ca", help="PEM file of the CA that signed the broker's certificate (implies --tls)")
    b.add_argument("--cert", help="PEM client certificate (implies --tls)")
    b.add_argument("--key", help="PEM private key of --cert (when not in the same file)")
    b.add_argument("--insecure", action="store_true", help="do not check the broker's host name (tests only)")
    b.add_argument("--username", help="MQTT user name")
    b.add_argument("--password-file", type=Path, help="file whose first line is the MQTT password")
    b.add_argument("--password-env", default="FLEETSIM_PASSWORD", help="environment variable with the password")
    b.add_argument("--prefix", default="fleet", help="topic prefix, as the bridges' [fleet] prefix (fleet)")
    b.add_argument("--fleet", default="sim", help="fleet id of the simulated devices (sim)")
    s = p.add_argument_group("fleet and run")
    s.add_argument("--devices", type=int, default=1000, help="simulated devices (1000)")
    s.add_argument("--first", type=int, default=0, help="number of the first device (0)")
    s.add_argument("--device-format", default="sim-{:06d}", help="device id from its number (sim-{:06d})")
    s.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (60)")
    s.add_argument("--report-s", type=float, default=10.0, help="seconds between progress lines (10)")
    s.add_argument("--drain-s", type=float, default=30.0, help="wait up to this for the last confirmations (30)")
    s.add_argument("--max-unconfirmed-s", type=float, default=30.0, help="older unconfirmed: not kept up (30)")
    s.add_argument("--no-confirms", dest="confirms", action="store_false", help="do not subscribe to confirm/1")
    s.add_argument("--processes", type=int, help=f"worker processes (one per {DEVICES_PER_PROCESS:,} devices)")
    s.add_argument("--connections", type=int, default=4, help="MQTT connections per process (4)")
    s.add_argument("--seed", type=int, default=0, help="random seed (0)")
    s.add_argument("--json", action="store_true", help="print each progress snapshot as a JSON line")
    d = Profile()
    f = p.add_argument_group("device profile (defaults: the edge's defaults at 1 Hz, telemetry every 10 s)")
    f.add_argument("--hz", type=float, default=d.hz, help=f"inferences per second per device ({d.hz:g})")
    f.add_argument("--telemetry-s", type=float, default=d.telemetry_s, help=f"telemetry window ({d.telemetry_s:g})")
    f.add_argument("--escalations", type=float, default=d.escalate_share, help="share escalated (0.05)")
    f.add_argument("--sample-share", type=float, default=d.sample_share, help="share sampled at most (0.02)")
    f.add_argument("--samples-per-minute", type=int, default=d.samples_per_minute, help="sample budget (3)")
    f.add_argument("--results-delay-s", type=float, default=d.results_delay_s, help="result/2 coalescing (10)")
    f.add_argument("--results-max-answers", type=int, default=d.results_max_answers, help="answers per result/2")
    f.add_argument("--timeout", type=float, default=d.escalation_timeout_s, help="escalation timeout s (2)")
    f.add_argument("--drift-share", type=float, default=d.drift_share, help="share of devices that drift (0.01)")
    f.add_argument("--drift-after-s", type=float, default=d.drift_after_s, help="drift starts after (30 s)")
    return p


def spec_from(args: argparse.Namespace) -> tuple[Spec, int]:
    """The run's spec and worker count; an unusable option raises `OptionsError`."""
    profile = Profile(
        hz=args.hz,
        telemetry_s=args.telemetry_s,
        escalate_share=args.escalations,
        sample_share=args.sample_share,
        samples_per_minute=args.samples_per_minute,
        results_delay_s=args.results_delay_s,
        results_max_answers=args.results_max_answers,
        escalation_timeout_s=args.timeout,
        drift_share=args.drift_share,
        drift_after_s=args.drift_after_s,
    )
    problems = profile.problems()
    if args.devices < 1:
        problems.append(f"--devices {args.devices} must be at least 1")
    if args.duration <= 0 or args.report_s <= 0:
        problems.append("--duration and --report-s must be above 0")
    if args.connections < 1 or (args.processes is not None and args.processes < 1):
        problems.append("--connections and --processes must be at least 1")
    try:
        for n in (args.first, args.first + args.devices - 1):
            validate_id("device_id", args.device_format.format(n))
        validate_id("fleet_id", args.fleet)
    except (TopicError, ValueError, IndexError, KeyError) as exc:
        problems.append(f"--device-format/--fleet: {exc}")
    if problems:
        raise OptionsError("; ".join(problems))
    password = None
    if args.password_file is not None:
        try:
            password = args.password_file.read_text(encoding="utf-8").splitlines()[0]
        except (OSError, IndexError) as exc:
            raise OptionsError(f"--password-file {args.password_file}: cannot read a first line ({exc})") from None
    elif args.password_env in os.environ:
        password = os.environ[args.password_env]
    tls = bool(args.tls or args.ca or args.cert)
    broker = BrokerOptions(
        host=args.host,
        port=args.port if args.port is not None else (8883 if tls else 1883),
        tls=tls,
        ca=args.ca,
        cert=args.cert,
        key=args.key,
        insecure=args.insecure,
        username=args.username,
        password=password,
    )
    broker.resolve()  # the TLS files, read once here so a bad one is named before any worker starts
    spec = Spec(
        broker=broker,
        profile=profile,
        devices=args.devices,
        first=args.first,
        prefix=args.prefix,
        fleet=args.fleet,
        device_format=args.device_format,
        connections=args.connections,
        seed=args.seed,
        track_confirms=args.confirms,
        report_s=min(args.report_s, 5.0),
        drain_s=args.drain_s,
    )
    return spec, args.processes or math.ceil(args.devices / DEVICES_PER_PROCESS)


async def run(args: argparse.Namespace, spec: Spec, processes: int) -> bool:
    fleet = Fleet(spec, processes)
    print(
        f"fleetsim {__version__}: {spec.devices:,} devices on {spec.broker.host}:{spec.broker.port} "
        f"({processes} process(es) x {spec.connections} connection(s)), {args.duration:g} s; profile "
        + ", ".join(f"{k}={v:g}" for k, v in asdict(spec.profile).items()),
        flush=True,
    )
    start = await fleet.start()
    result = Run(spec.devices, spec.profile.escalation_timeout_s)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.duration
    try:
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(args.report_s, left))
            result.add(fleet.snapshot())
            show(args, result, start)
        end_of_traffic = result.snapshots[-1]
        print(f"stopping: offline statuses, then up to {spec.drain_s:g} s for the last confirmations", flush=True)
        final = await fleet.stop()
    finally:
        await fleet.kill()
    result.add(final)
    final.t = end_of_traffic.t  # rates over the traffic, not the drain
    lines = result.summary(start, final, confirms=spec.track_confirms, max_unconfirmed_s=args.max_unconfirmed_s)
    for line in lines:
        print(line, flush=True)
    if args.json:
        summary = {"final": True, "sent": dict(final.sent), **final.values, "verdict": lines[-1]}
        summary["refused"] = dict(final.refused)
        summary["latency_p50_ms"] = pct(result.latencies_ms, 0.5)
        summary["late_s"] = result.late_s
        print(json.dumps(summary), flush=True)
    return lines[-1] == "verdict: kept up"


def show(args: argparse.Namespace, result: Run, start: Snapshot) -> None:
    cur = result.snapshots[-1]
    if args.json:
        line = {"t": cur.t, "sent": dict(cur.sent), **cur.values, "late_s": cur.late_s}
        line["oldest_unconfirmed_s"] = cur.oldest_unconfirmed_s
        print(json.dumps(line), flush=True)
    else:
        print(result.progress(start), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        spec, processes = spec_from(args)
        kept_up = asyncio.run(run(args, spec, processes))
    except (OptionsError, SimulatorError) as exc:
        print(f"fleetsim: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fleetsim: interrupted", file=sys.stderr)
        return 130
    return 0 if kept_up else 1
