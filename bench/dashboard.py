"""The Grafana dashboard's InfluxQL queries at fleet size, against a real InfluxDB 1.x.

A private InfluxDB (devservers/influxdb.py, Debian's 1.6.7) is filled with `--devices` devices' series
over the last `--minutes` as the bridge writes them (cloud_bridge/tsdb/lines.py): per 10 s telemetry
window the `inference` point, one `class_counts` point per class seen and `device_status`, and four
`drift` points per scored window; a status line per device and an `escalation` agreement point per
device a minute. Then every query of grafana/dashboards/fleet.json (panels and variables) runs as
Grafana would send it for the dashboard's default view: last hour, every fleet and device ("All"),
the graph step Grafana picks for a 1,500-pixel-wide panel. Each query's wall time (median of
`--rounds`), InfluxDB's CPU for it and the series and points it returned are printed; the last line
is the slowest query's wall time at `--devices` over the same query's on a `--small` fleet (100
devices by default) filled beside it in the same server: how the dashboard's cost grows with the fleet
(linear growth would be the ratio of the fleet sizes).

Run: `.venv/bin/python bench/dashboard.py --devices 10000 --minutes 60` (the fill is most of the run:
~60 million lines at 10,000 devices for an hour).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import msgspec  # noqa: E402
import numpy as np  # noqa: E402

from benchkit.typed import typed_devices  # noqa: E402
from cloud_bridge.tsdb.lines import agreement_line, drift_line, status_line, telemetry_lines  # noqa: E402
from devservers import InfluxDB  # noqa: E402
from devservers.influxdb import InfluxDBError  # noqa: E402
from schemas import EscalationCounts  # noqa: E402
from schemas.topics import Topics  # noqa: E402

DASHBOARD = ROOT / "grafana" / "dashboards" / "fleet.json"
DB = "edgefleet"
FLEET = "sim"
TICKS = os.sysconf("SC_CLK_TCK")
DRIFT_KINDS = ("prediction_drift", "confidence_drift", "feature_drift", "latency")
# Grafana's step: the range over the panel's width in pixels (maxDataPoints), rounded up to a nice interval.
WIDTH_PX = 1500
NICE_MS = (1000, 2000, 5000, 10_000, 15_000, 20_000, 30_000, 60_000, 120_000, 300_000, 600_000, 900_000, 1_800_000)


def lines(devices: int, minutes: float, now: float, seed: int = 3) -> Iterator[list[str]]:
    """One device's lines at a time, oldest first. A device's window is formatted once by the bridge's
    code and repeated at each window's time (formatting 60 million lines would be the whole bench)."""
    rng = np.random.default_rng(seed)
    topics = Topics()
    windows = int(minutes * 6)
    names = [f"sim-{i:06d}" for i in range(devices)]
    for device, _, template in typed_devices(topics, FLEET, names, [True] * devices, rng, now):
        sent = int(rng.binomial(10, 0.05))
        window = msgspec.structs.replace(
            template, escalations=EscalationCounts(sent=sent, answered=sent, agreed=sent - sent // 4)
        )
        model, version = window.model.name, window.model.version
        each = telemetry_lines(window) + [
            drift_line(FLEET, device.name, model, version, kind, 0.1, 0.5, False, now) for kind in DRIFT_KINDS
        ]
        heads = [text.rsplit(" ", 1)[0] + " " for text in each]
        agreement = agreement_line(FLEET, device.name, version, 9, 10, now).rsplit(" ", 1)[0] + " "
        phase = float(rng.uniform(0, 10.0))
        out = [status_line(FLEET, device.name, True, now - minutes * 60, model, version)]
        for k in range(windows):
            ts = str(round((now - (windows - 1 - k) * 10.0 - phase) * 1000))
            out += [head + ts for head in heads]
            if k % 6 == 5:
                out.append(agreement + ts)
        yield out


def step_ms(range_ms: int) -> int:
    raw = range_ms / WIDTH_PX
    return next((nice for nice in NICE_MS if nice >= raw), NICE_MS[-1])


def interval_text(ms: int) -> str:
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def render(query: str, start_ms: int, end_ms: int, interval_ms: int) -> str:
    """Grafana's substitutions for "All" fleets and devices (the custom all value `.*`)."""
    query = query.replace("${fleet}", ".*").replace("${device}", ".*")
    query = re.sub(r"\$fleet\b", ".*", query)
    query = re.sub(r"\$device\b", ".*", query)
    query = query.replace("$timeFilter", f"time >= {start_ms}ms and time <= {end_ms}ms")
    text = interval_text(interval_ms)
    query = query.replace("$__interval_ms", str(interval_ms)).replace("$__interval", text)
    return query.replace("$interval", text)


def queries() -> list[tuple[str, str]]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    out = [(f"variable {v['name']}", str(v["query"])) for v in board["templating"]["list"]]
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append((f"{panel['title'][:48]} [{target['refId']}]", str(target["query"])))
    return out


def influx_cpu(server: InfluxDB) -> float:
    assert server.pid is not None
    fields = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def fill(server: InfluxDB, db: str, devices: int, minutes: float, batch: int, now: float) -> None:
    server.create_database(db)
    started, written, pending = time.perf_counter(), 0, []
    cpu_before = influx_cpu(server)
    for device_lines in lines(devices, minutes, now):
        pending += device_lines
        if len(pending) >= batch:
            server.write_lines(pending, db)
            written, pending = written + len(pending), []
    if pending:
        server.write_lines(pending, db)
        written += len(pending)
    elapsed = time.perf_counter() - started
    print(
        f"{db}: {devices} devices, filled {written} lines in {elapsed:.0f} s ({written / elapsed:.0f} lines/s; "
        f"InfluxDB CPU {influx_cpu(server) - cpu_before:.0f} s)",
        flush=True,
    )


# Grafana's data proxy gives up on a query after 30 s ([dataproxy] timeout): a panel slower than that
# shows an error, so the bench stops waiting there too and says so.
GRAFANA_TIMEOUT_S = 30.0


def timed(server: InfluxDB, db: str, query: str, rounds: int) -> tuple[float, float, int, int, str]:
    """Median wall and InfluxDB CPU seconds of `query` on `db`, the series and points it returned, and
    its first error ("" if none; a query past GRAFANA_TIMEOUT_S counts that long and is not repeated)."""
    walls, cpus, result = [], [], []
    for _ in range(rounds):
        cpu, wall = influx_cpu(server), time.perf_counter()
        try:
            result = server.query(query, db, timeout_s=GRAFANA_TIMEOUT_S)
        except InfluxDBError as exc:
            if "timed out" not in str(exc):
                raise
            return GRAFANA_TIMEOUT_S, influx_cpu(server) - cpu, 0, 0, f"timed out after {GRAFANA_TIMEOUT_S:g} s"
        walls.append(time.perf_counter() - wall)
        cpus.append(influx_cpu(server) - cpu)
    series = [s for r in result for s in r.get("series", [])]
    errors = [str(r["error"]) for r in result if "error" in r]
    points = sum(len(s.get("values", [])) for s in series)
    return statistics.median(walls), statistics.median(cpus), len(series), points, errors[0] if errors else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument(
        "--small", type=int, default=100, help="devices of the baseline fleet, in its own database of the same server"
    )
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=20_000, help="lines per write request")
    args = parser.parse_args()
    print(f"{args.devices} devices, {args.minutes:g} min of series; load average {os.getloadavg()[0]:.1f}", flush=True)
    small_db = f"{DB}_small"
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp, InfluxDB(Path(tmp)) as server:
        now = time.time()
        fill(server, small_db, args.small, args.minutes, args.batch, now)
        fill(server, DB, args.devices, args.minutes, args.batch, now)
        end_ms = round(time.time() * 1000)
        start_ms = end_ms - round(args.minutes * 60_000)
        interval = step_ms(end_ms - start_ms)
        print(f"view: last {args.minutes:g} min, All fleets/devices, step {interval_text(interval)}")
        print(
            f"{'query':<58} {'wall s':>8} {'influx cpu s':>12} {'series':>7} {'points':>9} "
            f"{'wall s at ' + str(args.small):>14}"
        )
        slowest: tuple[float, float, str] = (0.0, 0.0, "")
        for title, query in queries():
            rendered = render(query, start_ms, end_ms, interval)
            wall_s, cpu_s, series, points, error = timed(server, DB, rendered, args.rounds)
            small_s = timed(server, small_db, rendered, args.rounds)[0]
            note = f"  ERROR {error}" if error else ""
            print(f"{title:<58} {wall_s:>8.3f} {cpu_s:>12.2f} {series:>7} {points:>9} {small_s:>14.3f}{note}")
            slowest = max(slowest, (wall_s, small_s, title))
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        wall_s, small_s, title = slowest
        print(f"slowest query: {title}, {wall_s:.2f} s at {args.devices} devices, {small_s:.3f} s at {args.small}")
        # How the slowest query grows with the fleet: linear growth would be devices/small.
        print(f"ratio {wall_s / max(small_s, 1e-3):.1f} slowest-query {args.devices}-devices/{args.small}-devices")


if __name__ == "__main__":
    main()
