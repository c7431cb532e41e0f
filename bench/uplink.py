"""Bytes an edge node costs on a billed link, counted at the TCP level, per channel, per encoding.

A real `edge-node` (replaying the demo digits) talks to a private Mosquitto through a counting TCP
proxy (`devservers.TcpProxy` with a `devservers.mqttwire.WireCounter` tap), while a real
`cloud-bridge` with the demo cloud model answers its escalations. Every byte in both directions is
booked to the channel of the MQTT packet it belongs to (PUBACKs to the channel they acknowledge,
CONNECT/PINGREQ/SUBSCRIBE to the protocol), so the figures are what an LTE plan would bill, not
payload sizes.

For each uplink encoding and each input rate (idle = no inputs, keepalive and telemetry only; 1, 20
and 100 Hz), the node runs for a warm-up, then the counters are read over a steady window. Printed:
bytes per inference (up + down), MB per device-day, and each channel's share. The last line is the
headline: `ratio X json/compact bytes-per-inference` at 20 Hz (with one encoding measured, the
ratio is 1.00).

All runs go at once (one node each, each behind its own counting proxy), after a warm-up past the
first minute: the escalation and sampling budgets start with a minute's worth, which a short window
would count as their rate.

Run: `.venv/bin/python bench/uplink.py` (about 3.5 minutes; `--seconds` shortens it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from demokit.models import build_demo_models
from devservers import ManagedProcess, Mosquitto, TcpProxy
from devservers.mqttwire import WireCounter
from devservers.programs import start_program, write_bridge_config

DAY_S = 86_400
RATES = (0.0, 1.0, 20.0, 100.0)  # 0 = idle
ENCODINGS = ("json", "compact")
MB = 1_000_000
IDLE_INTERVAL_S = 300.0  # [telemetry] idle_interval_s, the default


@dataclass(frozen=True)
class Measured:
    encoding: str
    mode: str  # "all" results uploaded, or "summary" (telemetry counts only)
    rate_hz: float
    seconds: float
    by_channel: dict[tuple[str, str], int]
    packets: dict[tuple[str, str], int]

    @property
    def total(self) -> int:
        return sum(self.by_channel.values())

    @property
    def per_inference(self) -> float:
        return self.total / (self.rate_hz * self.seconds) if self.rate_hz else float("nan")

    @property
    def mb_per_day(self) -> float:
        return self.total / self.seconds * DAY_S / MB


def _edge_toml(work: Path, name: str, port: int, model: Path, rate_hz: float, encoding: str, mode: str) -> Path:
    source = f'kind = "replay"\nrate_hz = {rate_hz}\nloop = true\n' if rate_hz else 'kind = "mqtt"\n'
    path = work / f"{name}.toml"
    path.write_text(
        f"""
[mqtt]
port = {port}
[device]
fleet_id = "bench"
device_id = "{name}"
[model]
path = "{model}"
[outbox]
path = "{work / name / "outbox.sqlite"}"
[source]
{source}"""
        + f'[uplink]\nencoding = "{"auto" if encoding == "compact" else encoding}"\n'
        + f"[routing]\npublish_results = {'true' if mode == 'all' else 'false'}\n"
    )
    return path


@dataclass
class _Running:
    run: tuple[str, str, float]
    name: str
    counter: WireCounter
    proxy: TcpProxy
    node: ManagedProcess
    before: tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]] = ({}, {})
    started: float = 0.0


def _start(work: Path, broker: Mosquitto, model: Path, run: tuple[str, str, float]) -> _Running:
    encoding, mode, rate_hz = run
    counter = WireCounter()
    proxy = TcpProxy("127.0.0.1", broker.port, tap=counter.feed)
    proxy.start()
    name = f"{encoding}-{mode}-{int(rate_hz)}hz"
    config = _edge_toml(work, name, proxy.port, model, rate_hz, encoding, mode)
    node = start_program("edge_node.cli", ["run", "--config", str(config)], work / f"{name}.log")
    return _Running(run, name, counter, proxy, node)


def measure_all(
    work: Path, broker: Mosquitto, model: Path, runs: list[tuple[str, str, float]], warmup: float, seconds: float
) -> list[Measured]:
    """Every run at once, each node behind its own counting proxy: the budgets start full (a
    minute's worth of escalations and samples), so the window opens after `warmup` and is long
    enough to see their steady rate."""
    running: list[_Running] = []
    try:
        for run in runs:
            running.append(_start(work, broker, model, run))
        time.sleep(warmup)
        for r in running:
            if not r.node.alive:
                raise RuntimeError(f"edge node exited early ({r.node.returncode}); see {work / f'{r.name}.log'}")
            r.before = (r.counter.snapshot(), r.counter.packet_snapshot())
            r.started = time.monotonic()
        time.sleep(seconds)
        out: list[Measured] = []
        for r in running:
            after, packets_after = r.counter.snapshot(), r.counter.packet_snapshot()
            elapsed = time.monotonic() - r.started
            before, packets_before = r.before
            by_channel = {key: after.get(key, 0) - before.get(key, 0) for key in after}
            packets = {key: packets_after.get(key, 0) - packets_before.get(key, 0) for key in packets_after}
            encoding, mode, rate_hz = r.run
            out.append(
                Measured(
                    encoding,
                    mode,
                    rate_hz,
                    elapsed,
                    {k: v for k, v in by_channel.items() if v},
                    {k: v for k, v in packets.items() if v},
                )
            )
        return out
    finally:
        for r in running:
            r.node.terminate(30)
            r.proxy.stop()


def _print_detail(m: Measured) -> None:
    """Per channel and direction: bytes per second, packets per second, bytes per packet."""
    rate = "idle" if not m.rate_hz else f"{m.rate_hz:g} Hz"
    print(f"-- {m.encoding} {m.mode} {rate}: channel, direction, B/s, packets/s, B/packet")
    for (direction, channel), n in sorted(m.by_channel.items(), key=lambda kv: -kv[1]):
        count = m.packets.get((direction, channel), 0)
        per = f"{n / count:.0f}" if count else "-"
        print(f"   {channel:<18} {direction:<4} {n / m.seconds:>9.1f} {count / m.seconds:>8.2f} {per:>7}")


def _print(results: list[Measured]) -> None:
    print(
        f"{'encoding':<9} {'results':<8} {'rate':>6} {'B/inference':>12} {'MB/day':>9}"
        "  top channels (share of bytes, up+down)"
    )
    for m in results:
        shares: dict[str, int] = {}
        for (_, channel), n in m.by_channel.items():
            shares[channel.removeprefix("ack:")] = shares.get(channel.removeprefix("ack:"), 0) + n
        top = sorted(shares.items(), key=lambda kv: -kv[1])[:6]
        text = ", ".join(f"{c} {n / m.total:.0%}" for c, n in top)
        rate = "idle" if not m.rate_hz else f"{m.rate_hz:g} Hz"
        per = "-" if not m.rate_hz else f"{m.per_inference:.1f}"
        print(f"{m.encoding:<9} {m.mode:<8} {rate:>6} {per:>12} {m.mb_per_day:>9.2f}  {text}")


def _targets(results: list[Measured], best: str) -> None:
    """The issue's targets, each with what this run measured."""
    for m in results:
        if m.encoding != best:
            continue
        if m.rate_hz == 20.0 and m.mode == "all":
            print(f"target <= 60 B/inference at 20 Hz, every result uploaded: {m.per_inference:.1f}")
        elif m.rate_hz == 20.0 and m.mode == "summary":
            print(f"target <= 10 MB/day at 20 Hz, results summarised: {m.mb_per_day:.2f}")
        elif m.rate_hz == 0.0:
            # An idle node sends a telemetry window every [telemetry] idle_interval_s (300 s), which
            # a window shorter than that may not see: add one, sized as the 1 Hz run's windows.
            sized = next((r for r in results if r.encoding == m.encoding and r.rate_hz == 1.0), None)
            extra = 0.0
            if sized is not None:
                windows = sum(n for (_, c), n in sized.packets.items() if c == "telemetry")
                window_bytes = sum(n for (_, c), n in sized.by_channel.items() if c in ("telemetry", "ack:telemetry"))
                confirms = sum(n for (_, c), n in sized.by_channel.items() if c in ("confirm", "ack:confirm"))
                n_confirms = max(1, sum(n for (d, c), n in sized.packets.items() if c == "confirm"))
                if windows:
                    extra = (window_bytes / windows + confirms / n_confirms) / IDLE_INTERVAL_S * DAY_S / MB
            print(
                f"target <= 0.5 MB/day idle: {m.mb_per_day:.3f} measured + {extra:.3f} for a window every "
                f"{IDLE_INTERVAL_S:g} s = {m.mb_per_day + extra:.3f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="steady window (default 120)")
    parser.add_argument("--warmup", type=float, default=70.0, help="seconds before the window opens (default 70)")
    parser.add_argument("--encodings", default=",".join(ENCODINGS), help="comma-separated (default: all)")
    parser.add_argument("--detail", action="store_true", help="per channel: B/s, packets/s, B/packet")
    parser.add_argument("--rates", default=",".join(f"{r:g}" for r in RATES), help="Hz, comma-separated; 0 = idle")
    parser.add_argument("--no-summary", action="store_true", help="skip the results-summarised run (compact, 20 Hz)")
    args = parser.parse_args(argv)
    encodings = [e for e in args.encodings.split(",") if e]
    rates = [float(r) for r in args.rates.split(",") if r]
    runs = [(encoding, "all", rate) for encoding in encodings for rate in rates]
    if not args.no_summary:
        runs.append((encodings[-1], "summary", 20.0))
    with tempfile.TemporaryDirectory(prefix="bench-uplink-") as tmp:
        work = Path(tmp)
        models = build_demo_models(work / "models")
        broker = Mosquitto(work / "broker")
        broker.start()
        config = write_bridge_config(
            work,
            broker,
            escalation={"model": models["cloud"].path},
            drift={"enabled": False},
            rollout={"enabled": False},
        )
        bridge = start_program("cloud_bridge.cli", ["run", "--config", str(config)], work / "bridge.log")
        try:
            print(
                f"running {len(runs)} nodes at once ({args.warmup:g} s warm-up, {args.seconds:g} s window)",
                file=sys.stderr,
                flush=True,
            )
            results = measure_all(work, broker, models["edge"].path, runs, args.warmup, args.seconds)
        finally:
            bridge.terminate(30)
            broker.stop()
    if args.detail:
        for m in results:
            _print_detail(m)
    _print(results)
    for m in results:
        down = sum(
            n for (_, channel), n in m.by_channel.items() if channel.removeprefix("ack:") in ("confirm", "clock/reply")
        )
        rate = "idle" if not m.rate_hz else f"{m.rate_hz:g} Hz"
        per_hour = down / m.seconds * 3600 / 1000
        print(f"{m.encoding} {m.mode} {rate}: confirmations and clock replies {per_hour:.1f} kB per device-hour")
    _targets(results, encodings[-1])
    at20 = {m.encoding: m.per_inference for m in results if m.rate_hz == 20.0 and m.mode == "all"}
    base, best = at20.get("json", float("nan")), at20.get(encodings[-1], float("nan"))
    print(f"20 Hz: {base:.1f} B/inference json, {best:.1f} {encodings[-1]}")
    print(f"ratio {base / best:.2f} json/{'compact' if 'compact' in at20 else encodings[-1]} bytes-per-inference")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
