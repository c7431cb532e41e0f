"""Run a demo fleet on this machine and show what the system does, in under two minutes.

It starts its own Mosquitto on a free port, the cloud bridge (escalation answers with the larger
model, drift detection, signed OTA and canary rollouts, registry in a local SQLite file) and several
edge nodes replaying the digits held-out set. A third of the way in, the last device's inputs start
rotating (drift): the bridge raises a drift alert. A little later a better edge model is rolled out
as a canary (one device first, then the whole fleet) and promoted, or rolled back if the canary looks
worse. A live table shows the fleet; the run ends with a summary and a report with plots.

    python -m demo [--seconds 75] [--devices 4] [--workdir build/demo]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_bridge.cli import main as cloud_cli
from cloud_bridge.ota.keys import GeneratedKey, generate
from demo.report import write_report
from demo.watch import FleetWatch
from demokit.models import DemoModel, build_demo_models, build_edge_model
from devservers import Mosquitto
from schemas import Topics

RATE_HZ = 40.0
FLEET = "demo"
CANDIDATE_VERSION = "1.1.0"


@dataclass(frozen=True)
class Plan:
    """When things happen, in seconds since the fleet started."""

    seconds: float
    drift_at: float
    rollout_at: float

    @classmethod
    def for_run(cls, seconds: float) -> Plan:
        return cls(seconds, drift_at=seconds / 3, rollout_at=seconds * 0.4)


def _edge_toml(workdir: Path, port: int, device: str, model: Path, key: GeneratedKey, drift_after: int | None) -> Path:
    drift = f'drift = "rotation"\ndrift_strength = 20.0\ndrift_after = {drift_after}\n' if drift_after else ""
    path = workdir / f"{device}.toml"
    path.write_text(f"""
[mqtt]
port = {port}
[device]
fleet_id = "{FLEET}"
device_id = "{device}"
[model]
path = "{model}"
[routing]
confidence_threshold = 0.8
escalation_timeout_s = 2.0
# The demo shows what escalation does to accuracy, so it escalates every unsure input (a device on a
# billed link keeps the default budget of 6 a minute, examples/edge.toml).
max_escalations_per_minute = 1200
[sampling]
max_per_minute = 120
[uplink]
results_max_delay_s = 1.0  # the demo's plots follow the answers live
[telemetry]
interval_s = 1.0
[outbox]
path = "{workdir / device / "outbox.sqlite"}"
[ota]
chunk_timeout_s = 3.0
health_probation_s = 3.0
probation_min_inferences = 50
[source]
kind = "replay"
rate_hz = {RATE_HZ}
seed = {sum(map(ord, device)) % 1000}
{drift}
[ota.trusted_keys]
{key.device_toml()}""")
    return path


def _cloud_toml(workdir: Path, port: int, cloud_model: Path, key: GeneratedKey) -> Path:
    config = workdir / "cloud.toml"
    config.write_text(f"""
state_dir = "{workdir / "bridge-state"}"
status_interval_s = 5.0
[mqtt]
port = {port}
[escalation]
model = "{cloud_model}"
[registry]
url = "sqlite+aiosqlite:///{workdir / "registry.db"}"
[ota]
signing_key = "{key.private_path}"
chunk_size = 16384
[rollout]
tick_s = 0.5
lease_s = 5.0
window_s = 6.0
min_inferences = 150
min_answered = 10
[drift]
baseline_windows = 8
cooldown_s = 30.0
""")
    return config


def _cloud_cli(*args: str) -> str:
    """Run a `cloud-bridge` subcommand in this process; return what it printed, raise if it failed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cloud_cli(list(args))
    if code != 0:
        raise RuntimeError(f"cloud-bridge {' '.join(args)} failed with exit code {code}: {out.getvalue()}")
    return out.getvalue()


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


def _build_models() -> tuple[dict[str, DemoModel], DemoModel]:
    print("building demo models from scikit-learn's bundled digits ...", flush=True)
    out = Path("build/models").resolve()
    models = build_demo_models(out)
    candidate = build_edge_model(out, CANDIDATE_VERSION, hidden=(32,), seed=1)
    for m in (*models.values(), candidate):
        print(f"  {m.name} {m.version}: held-out accuracy {m.heldout_accuracy:.3f}  ({m.path})")
    return models, candidate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=75.0, help="how long the fleet runs (default 75)")
    parser.add_argument("--devices", type=int, default=4, help="edge nodes to start (default 4)")
    parser.add_argument("--workdir", type=Path, default=Path("build/demo"), help="state, logs and configs")
    args = parser.parse_args(argv)
    workdir: Path = args.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    plan = Plan.for_run(args.seconds)
    models, candidate = _build_models()
    key = generate(workdir / "keys")
    broker = Mosquitto(workdir / "broker")
    broker.start()
    print(f"mosquitto listening on 127.0.0.1:{broker.port} (log: {broker.log_path})")
    cloud_config = _cloud_toml(workdir, broker.port, models["cloud"].path, key)
    for model in (models["edge"], candidate):
        _cloud_cli("models", "add", str(model.path), "--config", str(cloud_config))
    watch = FleetWatch(broker.host, broker.port, Topics())
    watch.start()
    procs: list[subprocess.Popen[bytes]] = []
    rollout_id = ""
    try:
        bridge_cmd = [sys.executable, "-m", "cloud_bridge.cli", "run", "--config", str(cloud_config)]
        procs.append(_spawn(bridge_cmd, workdir / "cloud-bridge.log"))
        devices = [f"pi-{i:04d}" for i in range(1, args.devices + 1)]
        drift_after = int(RATE_HZ * plan.drift_at)
        for i, device in enumerate(devices):
            drifting = i == len(devices) - 1
            toml = _edge_toml(workdir, broker.port, device, models["edge"].path, key, drift_after if drifting else None)
            procs.append(
                _spawn([sys.executable, "-m", "edge_node.cli", "run", "--config", str(toml)], workdir / f"{device}.log")
            )
        print(
            f"started the cloud bridge and {len(devices)} edge nodes. Plan: {devices[-1]} drifts (inputs rotate 20°) "
            f"at ~{plan.drift_at:.0f}s; digits-edge {CANDIDATE_VERSION} rolls out at ~{plan.rollout_at:.0f}s "
            f"(canary 25%, then 100%). Logs in {workdir}\n",
            flush=True,
        )
        start = time.monotonic()
        interactive = sys.stdout.isatty()
        while (elapsed := time.monotonic() - start) < args.seconds:
            crashed = [p.args for p in procs if p.poll() is not None]
            if crashed:
                print(f"a process exited early: {crashed}; see the logs in {workdir}", file=sys.stderr)
                break
            if not rollout_id and elapsed >= plan.rollout_at:
                rollout_id = _start_rollout(cloud_config, candidate)
            view = watch.render(elapsed, args.seconds)
            print(("\x1b[H\x1b[J" if interactive else "") + view + "\n", flush=True)
            time.sleep(2.0 if interactive else 5.0)
        codes = _stop_all(procs[1:]) + _stop_all(procs[:1])
        time.sleep(1.0)  # the last telemetry windows are in flight from the just-stopped nodes
    finally:
        _stop_all(procs)
        watch.stop()
        broker.stop()
    rollout = _rollout_status(cloud_config, rollout_id) if rollout_id else None
    return _summary(watch, codes, workdir, plan, devices[-1], rollout)


def _start_rollout(cloud_config: Path, candidate: DemoModel) -> str:
    out = _cloud_cli(
        "rollout", "start", "--model", candidate.name, "--version", candidate.version,
        "--stages", "25,100", "--fleet", FLEET, "--config", str(cloud_config),
    )  # fmt: skip
    rollout_id = out.split()[0]
    print(f"rollout {rollout_id} of {candidate.name} {candidate.version} started", flush=True)
    return rollout_id


def _rollout_status(cloud_config: Path, rollout_id: str) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(
        _cloud_cli("rollout", "status", rollout_id, "--json", "--config", str(cloud_config))
    )
    return status


def _summary(
    watch: FleetWatch,
    codes: list[int | None],
    workdir: Path,
    plan: Plan,
    drifting: str,
    rollout: dict[str, Any] | None,
) -> int:
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
    detected = _drift_lines(watch, plan, drifting, out)
    promoted_or_rolled_back = _rollout_lines(watch, rollout, out)
    out(f"exit codes (edge nodes..., cloud): {codes}; logs and state in {workdir}")
    ok = lost_total == 0 and all(c == 0 for c in codes) and detected and promoted_or_rolled_back
    out("demo OK" if ok else "demo FAILED: see above")
    report = write_report(watch, lines, workdir / "report")
    print("\n==== summary ====")
    print("\n".join(lines[:-1]))
    print(f"report with plots: {report}")
    print(lines[-1])
    return 0 if ok else 1


def _drift_lines(watch: FleetWatch, plan: Plan, drifting: str, out: Any) -> bool:
    """Alerts, and how long after the injected drift began (its first input: the drifting node's
    first result plus the inputs it replays before drifting)."""
    first = watch.devices[drifting].first_result_at if drifting in watch.devices else None
    began = None if first is None else first + plan.drift_at
    firing = [a for a in watch.alerts if a.state == "firing"]
    on_target = [a for a in firing if a.device == drifting and (began is None or a.at >= began)]
    if began is not None:
        out(f"drift injected on {drifting} (inputs rotate 20°) from t={began:.0f}s")
    for a in firing:
        after = f", {a.at - began:.0f}s after the drift began" if a.device == drifting and began is not None else ""
        out(
            f"drift alert: {a.device} {a.kind} at t={a.at:.0f}s (score {a.score:.2f} > {a.threshold:.2f}, "
            f"model {a.model}){after}"
        )
    if not on_target:
        out(f"drift NOT detected on {drifting}")
    false_alerts = sum(a.device != drifting for a in firing)
    out(f"drift alerts on devices without injected drift: {false_alerts}")
    return bool(on_target)


def _rollout_lines(watch: FleetWatch, rollout: dict[str, Any] | None, out: Any) -> bool:
    if rollout is None:
        out("rollout: not started (run longer than --seconds 30)")
        return False
    state = rollout.get("state", "?")
    reason = rollout.get("reason") or ""
    devices = ", ".join(f"{d['device_id']}@stage{d['stage']}" for d in rollout.get("devices", []))
    out(
        f"rollout {rollout['id']} of {rollout.get('model_name')} {rollout.get('model_version')}: {state}"
        + (f" ({reason})" if reason else "")
        + f"; devices {devices or 'none'}"
    )
    versions = {name: sorted(d.models_seen) for name, d in sorted(watch.devices.items())}
    out("model versions that answered, per device: " + ", ".join(f"{n} {v}" for n, v in versions.items()))
    return state in ("promoted", "rolled_back")


if __name__ == "__main__":
    raise SystemExit(main())
