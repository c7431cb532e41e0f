"""Run a demo fleet on this machine: its own Mosquitto on a free port, a cloud side answering
escalations with the larger model, and several edge nodes replaying the digits held-out set (one of
them drifting halfway through). A live table shows the fleet; the run ends with a summary.

    python -m demo [--seconds 45] [--devices 3] [--workdir build/demo]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from demo.report import write_report
from demo.watch import FleetWatch
from devservers import Mosquitto
from edge_node.demo_models import build_demo_models
from schemas import Topics

RATE_HZ = 40.0


def _edge_toml(workdir: Path, port: int, device: str, model: Path, drift_after: int | None) -> Path:
    drift = f'drift = "rotation"\ndrift_strength = 20.0\ndrift_after = {drift_after}\n' if drift_after else ""
    path = workdir / f"{device}.toml"
    path.write_text(f"""
[mqtt]
port = {port}
[device]
fleet_id = "demo"
device_id = "{device}"
[model]
path = "{model}"
[routing]
confidence_threshold = 0.8
escalation_timeout_s = 2.0
[sampling]
max_per_minute = 120
[telemetry]
interval_s = 2.0
[outbox]
path = "{workdir / device / "outbox.sqlite"}"
[source]
kind = "replay"
rate_hz = {RATE_HZ}
seed = {hash(device) % 1000}
{drift}""")
    return path


def _cloud_command(workdir: Path, port: int, cloud_model: Path) -> list[str]:
    config = workdir / "cloud.toml"
    config.write_text(f"""
state_dir = "{workdir / "bridge-state"}"
[mqtt]
port = {port}
[escalation]
model = "{cloud_model}"
[registry]
url = "sqlite+aiosqlite:///{workdir / "registry.db"}"
""")
    return [sys.executable, "-m", "cloud_bridge.cli", "run", "--config", str(config)]


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


def _stop_all(procs: list[subprocess.Popen[bytes]], timeout: float = 20.0) -> list[int | None]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return [p.returncode for p in procs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=45.0, help="how long the fleet runs (default 45)")
    parser.add_argument("--devices", type=int, default=3, help="edge nodes to start (default 3)")
    parser.add_argument("--workdir", type=Path, default=Path("build/demo"), help="state, logs and configs")
    args = parser.parse_args(argv)
    workdir: Path = args.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)

    print("building demo models from scikit-learn's bundled digits ...", flush=True)
    models = build_demo_models(Path("build/models").resolve())
    for m in models.values():
        print(f"  {m.name} {m.version}: held-out accuracy {m.heldout_accuracy:.3f}  ({m.path})")

    broker = Mosquitto(workdir / "broker")
    broker.start()
    print(f"mosquitto listening on 127.0.0.1:{broker.port} (log: {broker.log_path})")
    watch = FleetWatch(broker.host, broker.port, Topics())
    watch.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        cloud = _spawn(_cloud_command(workdir, broker.port, models["cloud"].path), workdir / "cloud-bridge.log")
        procs.append(cloud)
        drift_after = int(RATE_HZ * args.seconds / 2)
        devices = [f"pi-{i:04d}" for i in range(1, args.devices + 1)]
        for i, device in enumerate(devices):
            drifting = i == len(devices) - 1
            toml = _edge_toml(workdir, broker.port, device, models["edge"].path, drift_after if drifting else None)
            procs.append(
                _spawn([sys.executable, "-m", "edge_node.cli", "run", "--config", str(toml)], workdir / f"{device}.log")
            )
        print(
            f"started the cloud side and {len(devices)} edge nodes; {devices[-1]} drifts (rotation 20°) "
            f"after {drift_after} inputs. Logs in {workdir}\n",
            flush=True,
        )
        start = time.monotonic()
        interactive = sys.stdout.isatty()
        while (elapsed := time.monotonic() - start) < args.seconds:
            crashed = [p.args for p in procs if p.poll() is not None]
            if crashed:
                print(f"a process exited early: {crashed}; see the logs in {workdir}", file=sys.stderr)
                break
            view = watch.render(elapsed, args.seconds)
            print(("\x1b[H\x1b[J" if interactive else "") + view + "\n", flush=True)
            time.sleep(2.0 if interactive else 5.0)
        codes = _stop_all(procs[1:]) + _stop_all(procs[:1])
        time.sleep(1.0)  # the last telemetry windows are in flight from the just-stopped nodes
    finally:
        _stop_all(procs)
        watch.stop()
        broker.stop()
    return _summary(watch, codes, workdir)


def _summary(watch: FleetWatch, codes: list[int | None], workdir: Path) -> int:
    lines: list[str] = []
    out = lines.append  # the summary goes to the terminal and into the report
    lost_total = 0
    for name, d in sorted(watch.devices.items()):
        lost = d.telemetry_count - len(d.result_ids)
        lost_total += max(lost, 0)
        acc_e = d.edge_right / d.with_truth if d.with_truth else 0.0
        acc_f = d.final_right / d.with_truth if d.with_truth else 0.0
        esc = d.escalated / d.results if d.results else 0.0
        out(
            f"{name}: {d.results} results, accuracy edge-only {acc_e:.3f} -> with escalation {acc_f:.3f}, "
            f"escalated {esc:.1%}, samples sent {d.samples}, lost {lost}"
        )
        if len(d.windows) >= 4:
            half = len(d.windows) // 2
            before = sum(w[1] for w in d.windows[:half]) / half
            after = sum(w[1] for w in d.windows[half:]) / (len(d.windows) - half)
            out(f"    mean confidence first half {before:.3f}, second half {after:.3f}")
    out(f"messages lost: {lost_total} (inferences counted in telemetry minus results received)")
    out(f"exit codes (edge nodes..., cloud): {codes}; logs and state in {workdir}")
    ok = lost_total == 0 and all(c == 0 for c in codes)
    out("demo OK" if ok else "demo FAILED: see above")
    report = write_report(watch, lines, workdir / "report")
    print("\n==== summary ====")
    print("\n".join(lines[:-1]))
    print(f"report with plots: {report}")
    print(lines[-1])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
