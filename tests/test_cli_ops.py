"""Both command lines fail politely and show the fleet: one line (no traceback) for a user's error,
`--config` required wherever a command reads the config, `--version`, `cmd` with the broker down or
waiting on an offline device, and `cloud-bridge devices` / `alerts` on a registry of 10,000 devices."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from cloud_bridge import __version__ as bridge_version
from cloud_bridge.cli.alerts import recent_alerts
from cloud_bridge.cli.devices import fleet_devices
from cloud_bridge.cli.waiting import Waiting
from cloud_bridge.ota.keys import generate
from cloud_bridge.registry import AlertRow, Device, Registry, SeenMessage, TelemetryRow
from demokit.models import DemoModel
from devservers import Mosquitto
from devservers.ports import free_port
from edge_node import __version__ as edge_version

pytestmark = pytest.mark.timeout(120)

BRIDGE = [sys.executable, "-m", "cloud_bridge.cli"]
EDGE = [sys.executable, "-m", "edge_node.cli"]


def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


async def arun(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run, argv)


def bridge_toml(tmp_path: Path, port: int, extra: str = "") -> Path:
    path = tmp_path / "cloud.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[mqtt]\nhost = "127.0.0.1"\nport = {port}\n{extra}', encoding="utf-8"
    )
    return path


async def make_registry(url: str) -> Registry:
    registry = Registry(url)
    await registry.create()
    return registry


def test_version_on_both_programs() -> None:
    assert run([*BRIDGE, "--version"]).stdout == f"cloud-bridge {bridge_version}\n"
    assert run([*EDGE, "--version"]).stdout == f"edge-node {edge_version}\n"


@pytest.mark.parametrize(
    "command",
    [
        ["run"],
        ["check"],
        ["models", "add", "x.onnx"],
        ["models", "list"],
        ["samples", "export", "--since", "1h", "--out", "x"],
        ["samples", "tail"],
        ["rollout", "status"],
        ["rollout", "abort", "r1"],
        ["cmd", "ping", "--device", "f/d"],
        ["devices"],
        ["alerts"],
    ],
)
def test_config_is_required_by_every_command_that_reads_it(command: list[str]) -> None:
    out = run([*BRIDGE, *command])
    assert out.returncode == 2 and "the following arguments are required: --config" in out.stderr


@pytest.mark.parametrize("command", [["models", "list"], ["rollout", "status"], ["devices"], ["alerts"]])
def test_reading_commands_do_not_create_a_registry(tmp_path: Path, command: list[str]) -> None:
    config = bridge_toml(tmp_path, 1883)
    out = run([*BRIDGE, *command, "--config", str(config)])
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"cloud-bridge {' '.join(command)}: config error: no registry database at ")
    assert len(out.stderr.splitlines()) == 1 and not (tmp_path / "state").exists()


def test_quantize_register_needs_the_config(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    out = run([*BRIDGE, "models", "quantize", str(model), "--calibration", "digits", "--out", "o", "--register"])
    assert out.returncode == 2 and "--register needs --config" in out.stderr


def test_cmd_with_the_broker_down_is_one_line_naming_it(tmp_path: Path) -> None:
    key = generate(tmp_path / "keys")
    port = free_port()
    config = bridge_toml(tmp_path, port, f'[ota]\nsigning_key = "{key.private_path}"\n')
    out = run([*BRIDGE, "cmd", "ping", "--device", "f1/d1", "--config", str(config), "--timeout", "5"])
    assert out.returncode == 1, out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"cloud-bridge cmd ping: the broker at 127.0.0.1:{port} (")
    assert "fix: start the broker" in line and "cloud-bridge check" in line


async def test_cmd_update_says_why_it_waits_for_an_offline_device(
    tmp_path: Path, mosquitto: Mosquitto, demo_models: dict[str, DemoModel]
) -> None:
    key = generate(tmp_path / "keys")
    config = bridge_toml(tmp_path, mosquitto.port, f'[ota]\nsigning_key = "{key.private_path}"\n')
    edge = demo_models["edge"]
    added = await arun([*BRIDGE, "models", "add", str(edge.path), "--config", str(config)])
    assert added.returncode == 0, added.stderr
    registry = Registry(f"sqlite+aiosqlite:///{tmp_path / 'state' / 'registry.db'}")
    async with registry.engine.begin() as conn:
        await conn.execute(
            insert(Device), [{"fleet_id": "f1", "device_id": "d1", "online": False, "last_seen": time.time() - 600}]
        )
    await registry.close()
    argv = ["cmd", "update", "--device", "f1/d1", "--model", edge.name, "--version", edge.version]
    out = await arun([*BRIDGE, *argv, "--config", str(config), "--timeout", "7"])
    assert out.returncode == 3, out.stderr
    assert "still waiting: f1/d1 is offline per the registry (last seen 10m ago)" in out.stderr
    assert "Traceback" not in out.stderr


async def test_waiting_reasons(tmp_path: Path) -> None:
    registry = await make_registry(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    now = time.time()
    try:
        waiting = Waiting(registry, "f1", "d1", "update")
        assert "never heard of f1/d1" in await waiting.reason(None, now)
        async with registry.engine.begin() as conn:
            await conn.execute(
                insert(Device), [{"fleet_id": "f1", "device_id": "d1", "online": True, "last_seen": now}]
            )
        online = await waiting.reason(None, now)
        assert "online per the registry" in online and "is a cloud-bridge running?" in online
        chunks = await waiting.reason("downloading", now)
        assert "model chunks" in chunks and "no bridge has stored any message" in chunks
        async with registry.engine.begin() as conn:
            await conn.execute(insert(SeenMessage), [{"msg_id": "m1", "received_at": now - 3}])
        assert "a bridge stored a message 3s ago" in await waiting.reason("received", now)
        async with registry.engine.begin() as conn:
            await conn.execute(insert(SeenMessage), [{"msg_id": "m0", "received_at": now - 7200}])
        assert "installing" in await Waiting(registry, "f1", "d1", "update").reason("installing", now)
    finally:
        await registry.close()


# ---- devices and alerts -------------------------------------------------------------------------
FLEET_SIZE = 10_000


def _telemetry(fleet: str, device: str, i: int, end: float, count: int, depth: int, sent: int) -> dict[str, Any]:
    return {
        "msg_id": f"{device}-{i}",
        "fleet_id": fleet,
        "device_id": device,
        "model_name": "digits-edge",
        "model_version": "1.0.0",
        "window_start": end - 10,
        "window_end": end,
        "count": count,
        "body": {"count": count, "outbox": {"depth": depth}, "escalations": {"sent": sent}},
    }


async def test_devices_and_alerts_on_a_registry_of_ten_thousand_devices(tmp_path: Path) -> None:
    registry = await make_registry(f"sqlite+aiosqlite:///{tmp_path / 'state' / 'registry.db'}")
    now = time.time()
    devices = [
        {
            "fleet_id": "big" if n else "small",
            "device_id": f"d{n:05d}",
            "online": n % 3 != 0,
            "last_seen": now - n,
            "model_name": "digits-edge",
            "model_version": "1.0.0",
        }
        for n in range(FLEET_SIZE)
    ]
    # Three windows per device in the last half minute (rates), and one old window (not recent).
    windows = [
        _telemetry(d["fleet_id"], d["device_id"], i, now - 10 * i, count=50 + i, depth=i, sent=i)
        for d in devices
        for i in range(3)
    ] + [_telemetry(d["fleet_id"], d["device_id"], 9, now - 3600, 999, 999, 999) for d in devices]
    alerts = [
        {
            "msg_id": f"a{n}",
            "fleet_id": "big",
            "device_id": f"d{n:05d}",
            "alert_id": f"al{n // 2}",
            "kind": "latency",
            "state": "firing" if n % 2 == 0 else "resolved",
            "model_version": "1.0.0",
            "score": 2.0,
            "threshold": 1.5,
            "detail": "p95 up",
            "ts": now - 7200 + n,
        }
        for n in range(2000)
    ] + [
        {
            "msg_id": "old",
            "fleet_id": "big",
            "device_id": "d00001",
            "alert_id": "old",
            "kind": "prediction_drift",
            "state": "firing",
            "model_version": "1.0.0",
            "score": 0.5,
            "threshold": 0.2,
            "detail": "psi",
            "ts": now - 30 * 86400,
        },
    ]
    async with registry.engine.begin() as conn:
        await conn.execute(insert(Device), devices)
        await conn.execute(insert(TelemetryRow), windows)
        await conn.execute(insert(AlertRow), alerts)
    try:
        start = time.perf_counter()
        listed = await fleet_devices(registry, now, 300)
        elapsed = time.perf_counter() - start
        assert len(listed) == FLEET_SIZE and elapsed < 3.0, elapsed
        first = listed[0]  # big/d00001: ordered by fleet, then device
        assert (first["fleet_id"], first["device_id"], first["online"]) == ("big", "d00001", True)
        # Latest window's depth (i = 0); 50+51+52 inputs over 30 s of windows.
        assert first["outbox_depth"] == 0 and first["inputs_per_s"] == pytest.approx(153 / 30, abs=1e-3)
        assert first["escalations_per_s"] == pytest.approx(3 / 30, abs=1e-3)
        offline = await fleet_devices(registry, now, 300, fleet="big", online=False)
        assert len(offline) == len([d for d in devices if d["fleet_id"] == "big" and not d["online"]])

        start = time.perf_counter()
        recent = await recent_alerts(registry, now - 86400)
        assert time.perf_counter() - start < 3.0
        # 1000 alerts, each with a firing then a resolved message: all resolved now; plus the old
        # one still firing, listed first although a month old.
        assert len(recent) == 1001 and recent[0]["alert_id"] == "old" and recent[0]["state"] == "firing"
        assert {a["state"] for a in recent[1:]} == {"resolved"}
        assert [a["alert_id"] for a in await recent_alerts(registry, now, firing_only=True)] == ["old"]
    finally:
        await registry.close()
    config = bridge_toml(tmp_path, 1883)
    shown = await arun([*BRIDGE, "devices", "--config", str(config), "--fleet", "small", "--json"])
    assert shown.returncode == 0, shown.stderr
    (small,) = json.loads(shown.stdout)
    assert small["device_id"] == "d00000" and small["online"] is False and small["outbox_depth"] == 0
    table = await arun([*BRIDGE, "devices", "--config", str(config), "--online"])
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:4] == ["FLEET", "DEVICE", "STATE", "MODEL"]
    assert len(table.stdout.splitlines()) == 1 + sum(1 for d in devices if d["online"])
    alerts_out = await arun([*BRIDGE, "alerts", "--config", str(config), "--firing"])
    assert alerts_out.returncode == 0 and alerts_out.stdout.splitlines()[1].split()[:4] == [
        "firing",
        "prediction_drift",
        "big",
        "d00001",
    ]


# ---- edge-node ----------------------------------------------------------------------------------
def test_edge_errors_are_one_line(tmp_path: Path, demo_models: dict[str, DemoModel]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt]\nport = 70000\n", encoding="utf-8")
    out = run([*EDGE, "run", "--config", str(bad)])
    assert out.returncode == 2 and out.stderr.startswith("edge-node run: ") and "port" in out.stderr
    assert len(out.stderr.splitlines()) == 1
    # The outbox (and the OTA state next to it) under a regular file: the node cannot store anything;
    # it says so in one line and exits 1, whichever it finds first.
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    base = (
        f'[mqtt]\nport = {free_port()}\n[device]\nfleet_id = "f1"\ndevice_id = "d1"\n'
        f'[model]\npath = "{demo_models["edge"].path}"\n[outbox]\npath = "{blocker / "outbox.sqlite"}"\n'
        '[source]\nkind = "mqtt"\n'
    )
    config = tmp_path / "edge.toml"
    for extra, says in (("", "slot state"), (f'[ota]\nstate_dir = "{tmp_path / "ota"}"\n', "outbox")):
        config.write_text(base + extra, encoding="utf-8")
        out = run([*EDGE, "run", "--config", str(config)])
        assert out.returncode == 1, out.stderr
        errors = [line for line in out.stderr.splitlines() if line.startswith("edge-node run: ")]
        assert len(errors) == 1 and says in errors[0] and str(blocker) in errors[0] and "fix: " in errors[0]
        assert "Traceback" not in out.stderr
