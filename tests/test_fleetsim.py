"""`python -m fleetsim` against a real Mosquitto and a real `cloud-bridge run` (SQLite registry, the
demo cloud model answering escalations): what the registry stored is, type by type, what the
simulator says it sent; its escalations were answered; every stored message was confirmed back to
its device; over TLS with a client certificate too; and a broker that is not there, or a bad
option or CA file, is one line and exit status 2."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from demokit.models import DemoModel
from devservers import Mosquitto
from tests.broker_stack import start_cloud
from tests.config_files import write_bridge_config
from tests.pki import BRIDGE, GATEWAY, Pki
from tests.plugin_servers import MosquittoFactory
from tests.processes import run_cloud_bridge, stop, wait_logged

pytestmark = pytest.mark.timeout(150)
DEVICES = 200


def _count(db: Path, sql: str) -> int:
    with sqlite3.connect(db, timeout=10) as conn:
        (n,) = conn.execute(sql).fetchone()
    return int(n)


def test_what_the_simulator_sent_is_what_the_registry_stored(
    tmp_path: Path, mosquitto: Mosquitto, demo_models: dict[str, DemoModel]
) -> None:
    db = tmp_path / "registry.db"
    config = write_bridge_config(
        tmp_path,
        mosquitto,
        status_interval_s=1,
        mqtt={"client_id": "bridge-fleetsim"},
        fleet={"share_group": "bridges"},
        registry={"url": f"sqlite+aiosqlite:///{db}"},
        escalation={"model": demo_models["cloud"].path},
        ingest={"confirm_interval_s": 1.0},
    )
    with run_cloud_bridge(config, tmp_path / "bridge.log") as bridge:
        wait_logged(bridge, "mqtt connected")
        argv = [sys.executable, "-m", "fleetsim", "--port", str(mosquitto.port), "--devices", str(DEVICES)]
        argv += ["--duration", "10", "--report-s", "2", "--drain-s", "20", "--json"]
        # Shorter windows and coalescing than the defaults, and more escalations: every kind of
        # message several times per device within the run.
        argv += ["--telemetry-s", "2", "--results-delay-s", "2", "--escalations", "0.2", "--drift-after-s", "5"]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert run.returncode == 0, f"fleetsim exited {run.returncode}:\n{run.stdout}\n{run.stderr}"
        stop(bridge)
    progress = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    final = progress[-1]
    assert final["final"] and final["verdict"] == "verdict: kept up", run.stdout
    assert len(progress) >= 4  # a line every 2 s of the 10
    sent = final["sent"]
    assert {"status", "results", "telemetry", "escalate", "sample"} <= set(sent), sent
    assert sent["status"] == 2 * DEVICES  # a birth and a shutdown each
    # Type by type, the registry holds what was sent.
    assert _count(db, "SELECT count(*) FROM telemetry") == sent["telemetry"]
    assert _count(db, "SELECT count(*) FROM samples") == sent["sample"]
    assert _count(db, "SELECT count(DISTINCT msg_id) FROM results") == sent["results"]
    assert _count(db, "SELECT count(*) FROM results") == final["answers"]
    assert _count(db, "SELECT count(*) FROM command_acks") == sent.get("cmd_ack", 0)
    stored = sum(n for kind, n in sent.items() if kind not in ("escalate", "clock"))
    assert _count(db, "SELECT count(*) FROM seen_messages") == stored
    assert _count(db, "SELECT count(*) FROM devices WHERE NOT online") == DEVICES
    # The escalations were answered by the cloud model, and their answers came back in result/2.
    assert final["answered"] + final["timed_out"] + final["outstanding"] == final["escalations"] == sent["escalate"]
    assert final["answered"] >= 0.9 * final["escalations"] > 0
    assert _count(db, "SELECT count(*) FROM results WHERE path = 'cloud'") > 0
    # Every stored message was confirmed to its device.
    assert final["confirmed"] == stored and final["unconfirmed"] == 0
    assert final["errors"] == 0 and not final["refused"]


def test_no_broker_is_one_line_and_exit_2(tmp_path: Path) -> None:
    from devservers.ports import free_port

    port = free_port()
    argv = [sys.executable, "-m", "fleetsim", "--port", str(port), "--devices", "5", "--duration", "1"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2
    assert run.stderr.startswith("fleetsim: cannot connect to 127.0.0.1:") and "Traceback" not in run.stderr


def test_bad_options_are_named(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "fleetsim", "--devices", "0", "--escalations", "2", "--ca", str(tmp_path / "x")]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--devices 0" in run.stderr and "--escalations 2" in run.stderr


def test_over_tls_with_a_client_certificate(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, pki: Pki, demo_models: dict[str, DemoModel]
) -> None:
    """The shipped cloud broker (mosquitto/cloud.conf): the simulator on its client-certificate
    listener with a gateway's identity (the ACL lets a gateway speak for every device; the listener
    makes the identity the client id, so one connection), the bridge with its account over TLS. That
    listener makes the username the client id too, so the bridge's default own escalation session
    and its main one keep taking each other over: the bridge sees it and moves escalations to the
    main session, and nothing is lost on the way."""
    cloud = start_cloud(mosquitto_factory, pki)
    config = write_bridge_config(
        tmp_path,
        mqtt={
            "host": "127.0.0.1",
            "port": cloud.tls_port,
            "client_id": BRIDGE,
            "username": BRIDGE,
            "password": pki.password(BRIDGE),
            "tls_ca": pki.ca,
        },
        escalation={"model": demo_models["cloud"].path},
        ingest={"confirm_interval_s": 1.0},
    )
    with run_cloud_bridge(config, tmp_path / "bridge.log") as bridge:
        # Devices that escalate while the two sessions fight get their local fallback: start after it.
        wait_logged(bridge, "escalations moved to the [mqtt] session")
        certs = pki.dir / "gateways"
        argv = [sys.executable, "-m", "fleetsim", "--port", str(cloud.gateway_port), "--ca", str(pki.ca)]
        argv += ["--cert", str(certs / f"{GATEWAY}.crt"), "--key", str(certs / f"{GATEWAY}.key")]
        argv += ["--connections", "1", "--devices", "20", "--duration", "4", "--drain-s", "15", "--json"]
        argv += ["--telemetry-s", "2", "--results-delay-s", "1", "--escalations", "0.3"]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
        stop(bridge)
    assert run.returncode == 0, f"fleetsim exited {run.returncode}:\n{run.stdout}\n{run.stderr}"
    final = json.loads(run.stdout.splitlines()[-1])
    assert final["answered"] > 0 and final["confirmed"] == sum(
        n for kind, n in final["sent"].items() if kind not in ("escalate", "clock")
    )


def test_a_wrong_ca_is_named(tmp_path: Path, mosquitto_factory: MosquittoFactory, pki: Pki) -> None:
    cloud = start_cloud(mosquitto_factory, pki)
    other = tmp_path / "other-ca.pem"
    other.write_text("not a certificate\n")
    argv = [sys.executable, "-m", "fleetsim", "--port", str(cloud.tls_port), "--ca", str(other)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "other-ca.pem holds no PEM CA certificate" in run.stderr
