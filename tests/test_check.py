"""`edge-node check` and `cloud-bridge check` against real servers: every failure they name is made
for real (a closed port, a CA that did not sign the broker's certificate, an expired certificate, a
directory that cannot be written, a wrong password, an InfluxDB without the database, a signing
key that is the public half), and a configuration where every check passes, passes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cloud_bridge.app import running_bridge
from cloud_bridge.check import diagnose as bridge_diagnose
from cloud_bridge.config import BridgeConfig, MqttConfig
from cloud_bridge.ota.keys import generate
from cloud_bridge.registry import Registry
from common.checks import Checklist, Finding, probe_cert_file, probe_dir
from demokit.models import DemoModel
from devservers import InfluxDB, Mosquitto
from devservers.ports import free_port
from edge_node.check import diagnose as edge_diagnose
from tests.plugin_servers import MosquittoFactory

pytestmark = pytest.mark.timeout(120)

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


# ---- certificates made here ---------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def make_pki(out: Path, *, not_before: dt.datetime = NOW - DAY, not_after: dt.datetime = NOW + 365 * DAY) -> Pki:
    """A CA, and a certificate for 127.0.0.1 it signed, valid from `not_before` to `not_after`."""
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(f"check-test-ca-{out.name}"))
        .issuer_name(_name(f"check-test-ca-{out.name}"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - 10 * 365 * DAY)
        .not_valid_after(NOW + 10 * 365 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(ca_key, hashes.SHA256())
    )
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (out / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Pki(out / "ca.pem", out / "cert.pem", _write_key(key, out / "key.pem"))


def tls_broker(factory: MosquittoFactory, pki: Pki, *, require_certificate: bool = False) -> tuple[Mosquitto, int]:
    broker = factory(start=False)
    port = free_port(avoid={broker.port})
    lines = [f"cafile {pki.ca}", f"certfile {pki.cert}", f"keyfile {pki.key}"]
    if require_certificate:
        lines.append("require_certificate true")
    broker.add_listener(port, lines=tuple(lines))
    broker.start()
    return broker, port


def write_passwords(path: Path, *users: tuple[str, str]) -> Path:
    """A Mosquitto password file with these (user, password) pairs."""
    for n, (user, password) in enumerate(users):
        create = ["-c"] if n == 0 else []
        subprocess.run(["mosquitto_passwd", *create, "-b", str(path), user, password], check=True, timeout=30)
    return path


def password_broker(factory: MosquittoFactory, tmp_path: Path, user: str, password: str) -> Mosquitto:
    passwords = write_passwords(tmp_path / "passwords", (user, password))
    return factory(allow_anonymous=False, extra_conf=f"password_file {passwords}\n")


async def cli(program: str, config: Path) -> subprocess.CompletedProcess[str]:
    """`python -m PROGRAM check --config CONFIG` as a real process."""
    argv = [sys.executable, "-m", program, "check", "--config", str(config)]
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60)


# ---- configs ------------------------------------------------------------------------------------
def edge_config(tmp_path: Path, model: Path, port: int, *, extra_mqtt: str = "", outbox: Path | None = None) -> Path:
    key = generate(Path(tempfile.mkdtemp(dir=tmp_path, prefix="keys")))
    path = tmp_path / "edge.toml"
    path.write_text(
        f"""
[mqtt]
host = "127.0.0.1"
port = {port}
{extra_mqtt}
[device]
fleet_id = "f1"
device_id = "dev-1"
[model]
path = "{model}"
[outbox]
path = "{outbox or tmp_path / "state" / "outbox.sqlite"}"
[source]
kind = "mqtt"
[ota.trusted_keys]
"{key.key_id}" = "{key.public_b64}"
""",
        encoding="utf-8",
    )
    return path


def bridge_config(tmp_path: Path, model: Path, port: int, *, extra: str = "", mqtt: str = "") -> Path:
    path = tmp_path / "cloud.toml"
    path.write_text(
        f"""
state_dir = "{tmp_path / "bridge"}"
[mqtt]
host = "127.0.0.1"
port = {port}
client_id = "bridge-check"
{mqtt}
[escalation]
model = "{model}"
{extra}
""",
        encoding="utf-8",
    )
    return path


def by_name(checks: Checklist) -> dict[str, Finding]:
    return {f.name: f for f in checks.findings}


def statuses(checks: Checklist) -> dict[str, str]:
    return {f.name: f.status for f in checks.findings}


# ---- edge ---------------------------------------------------------------------------------------
async def test_edge_every_check_passes_over_tls_with_a_password(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, demo_models: dict[str, DemoModel]
) -> None:
    pki = make_pki(tmp_path / "pki")
    passwords = write_passwords(tmp_path / "passwords", ("dev-1", "s3cret"), ("cloud-bridge", "b"))
    broker = mosquitto_factory(start=False, allow_anonymous=False, extra_conf=f"password_file {passwords}\n")
    port = free_port(avoid={broker.port})
    broker.add_listener(port, lines=(f"cafile {pki.ca}", f"certfile {pki.cert}", f"keyfile {pki.key}"))
    broker.start()
    extra = f'tls_ca = "{pki.ca}"\nusername = "dev-1"\npassword = "s3cret"\n'
    config = edge_config(tmp_path, demo_models["edge"].path, port, extra_mqtt=extra)
    bridge = BridgeConfig(
        state_dir=str(tmp_path / "bridge"),
        mqtt=MqttConfig(port=broker.port, client_id="bridge-clock", username="cloud-bridge", password="b"),
    )
    async with running_bridge(bridge):  # answers the clock request
        checks = await edge_diagnose(config)
        assert not [f for f in checks.findings if f.status != "ok"], [f.line() for f in checks.findings]
        found = by_name(checks)
        assert "valid until" in found["tls"].found and "dev-1@127.0.0.1" in found["mqtt login"].found
        assert "off the cloud's" in found["clock"].found
        # The CLI prints the same, one line per check, and exits 0.
        out = await cli("edge_node.cli", config)
        assert out.returncode == 0, out.stdout + out.stderr
        assert len(out.stdout.splitlines()) == len(checks.findings) + 1 and out.stderr == ""
        # A clock 1000 s ahead: commands would be refused.
        skewed = by_name(await edge_diagnose(config, clock=lambda: time.time() + 1000))["clock"]
    assert skewed.status == "fail" and "+1000" in skewed.found and "max_clock_skew_s = 300" in skewed.found
    assert "NTP" in skewed.fix


async def test_edge_closed_port_fails_and_skips_the_login(tmp_path: Path, demo_models: dict[str, DemoModel]) -> None:
    port = free_port()
    checks = await edge_diagnose(edge_config(tmp_path, demo_models["edge"].path, port))
    found = by_name(checks)
    assert found["broker reachable"].status == "fail"
    assert (
        "connection refused" in found["broker reachable"].found and "start the broker" in found["broker reachable"].fix
    )
    assert found["mqtt login"].status == "skip" and f"127.0.0.1:{port} is not reachable" in found["mqtt login"].found
    out = await cli("edge_node.cli", tmp_path / "edge.toml")
    assert out.returncode == 1 and "fail  broker reachable" in out.stdout and "Traceback" not in out.stderr


async def test_edge_wrong_ca_names_the_issuer(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, demo_models: dict[str, DemoModel]
) -> None:
    _broker, port = tls_broker(mosquitto_factory, make_pki(tmp_path / "real"))
    other = make_pki(tmp_path / "other")
    config = edge_config(tmp_path, demo_models["edge"].path, port, extra_mqtt=f'tls_ca = "{other.ca}"\n')
    found = by_name(await edge_diagnose(config))
    assert found["tls"].status == "fail"
    assert "not signed by [mqtt] tls_ca" in found["tls"].found and "check-test-ca-real" in found["tls"].found
    assert "tls_ca at the CA certificate" in found["tls"].fix
    assert found["mqtt login"].status == "skip"


async def test_edge_expired_and_expiring_server_certificates(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, demo_models: dict[str, DemoModel]
) -> None:
    expired = make_pki(tmp_path / "expired", not_before=NOW - 60 * DAY, not_after=NOW - DAY)
    _broker, port = tls_broker(mosquitto_factory, expired)
    config = edge_config(tmp_path, demo_models["edge"].path, port, extra_mqtt=f'tls_ca = "{expired.ca}"\n')
    found = by_name(await edge_diagnose(config))
    assert found["tls"].status == "fail" and "expired on" in found["tls"].found and "renew" in found["tls"].fix

    soon = make_pki(tmp_path / "soon", not_after=NOW + 10 * DAY)
    _broker, port = tls_broker(mosquitto_factory, soon)
    config = edge_config(tmp_path, demo_models["edge"].path, port, extra_mqtt=f'tls_ca = "{soon.ca}"\n')
    found = by_name(await edge_diagnose(config))
    assert found["tls"].status == "warn" and "expires in 9 days" in found["tls"].found
    assert found["mqtt login"].status == "ok"  # a warning does not stop the checks after it


def test_client_certificate_dates(tmp_path: Path) -> None:
    old = make_pki(tmp_path / "old", not_before=NOW - 60 * DAY, not_after=NOW - DAY)
    finding = probe_cert_file("client certificate", old.cert, "[mqtt] tls_cert")
    assert finding.status == "fail" and "expired on" in finding.found
    future = make_pki(tmp_path / "future", not_before=NOW + DAY)
    finding = probe_cert_file("client certificate", future.cert, "[mqtt] tls_cert")
    assert finding.status == "fail" and "not valid before" in finding.found and "clock" in finding.fix
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    assert probe_cert_file("client certificate", garbage, "[mqtt] tls_cert").status == "fail"


async def test_edge_garbage_tls_ca_is_a_finding_not_a_traceback(
    tmp_path: Path, mosquitto: Mosquitto, demo_models: dict[str, DemoModel]
) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("-----BEGIN NOTHING-----\n")
    config = edge_config(tmp_path, demo_models["edge"].path, mosquitto.port, extra_mqtt=f'tls_ca = "{garbage}"\n')
    found = by_name(await edge_diagnose(config))
    assert found["tls"].status == "fail" and "holds no PEM CA certificate" in found["tls"].found
    assert found["mqtt login"].status == "skip" and "TLS" in found["mqtt login"].found


async def test_edge_wrong_password(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, demo_models: dict[str, DemoModel]
) -> None:
    broker = password_broker(mosquitto_factory, tmp_path, "dev-1", "right")
    extra = 'username = "dev-1"\npassword = "wrong"\n'
    found = by_name(await edge_diagnose(edge_config(tmp_path, demo_models["edge"].path, broker.port, extra_mqtt=extra)))
    assert found["broker reachable"].status == "ok"
    assert found["mqtt login"].status == "fail" and "refused the credentials" in found["mqtt login"].found
    assert "username and password" in found["mqtt login"].fix


async def test_edge_unwritable_outbox_directory(
    tmp_path: Path, mosquitto: Mosquitto, demo_models: dict[str, DemoModel]
) -> None:
    # Root writes through chmod: a path under a regular file is a directory nobody can make.
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    outbox = blocker / "state" / "outbox.sqlite"
    found = by_name(await edge_diagnose(edge_config(tmp_path, demo_models["edge"].path, mosquitto.port, outbox=outbox)))
    assert found["outbox dir"].status == "fail" and "is a file, not a directory" in found["outbox dir"].found
    assert found["ota state dir"].status == "fail"  # next to the outbox by default
    assert found["mqtt login"].status == "ok"


def test_an_immutable_directory_cannot_be_written(tmp_path: Path) -> None:
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    if subprocess.run(["chattr", "+i", str(frozen)], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("chattr +i is not supported on this file system")
    try:
        finding = probe_dir("outbox dir", frozen, "[outbox] path")
    finally:
        subprocess.run(["chattr", "-i", str(frozen)], check=True, timeout=30)
    assert finding.status == "fail" and "cannot write in" in finding.found and "lsattr" in finding.fix


async def test_edge_a_file_that_is_not_a_model(tmp_path: Path, mosquitto: Mosquitto) -> None:
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"not a model at all")
    found = by_name(await edge_diagnose(edge_config(tmp_path, fake, mosquitto.port)))
    assert found["model"].status == "fail" and "is not an ONNX model" in found["model"].found
    assert "Bring your own model" in found["model"].fix
    assert found["execution provider"].status == "skip"
    # No bridge runs: nobody answers the clock request.
    assert found["clock"].status == "warn" and "no cloud bridge answered" in found["clock"].found


async def test_edge_config_that_does_not_load_skips_everything(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text("[mqtt]\nport = 70000\n", encoding="utf-8")
    checks = await edge_diagnose(path)
    assert checks.findings[0].status == "fail" and "port" in checks.findings[0].found
    assert {f.status for f in checks.findings[1:]} == {"skip"}
    out = await cli("edge_node.cli", path)
    assert out.returncode == 2


# ---- bridge -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _influx_database(server: InfluxDB, name: str) -> Iterator[str]:
    server.create_database(name)
    try:
        yield name
    finally:
        server.drop_database(name)


async def test_bridge_every_check_passes(
    tmp_path: Path, mosquitto: Mosquitto, influxdb_session: InfluxDB, demo_models: dict[str, DemoModel]
) -> None:
    key = generate(tmp_path / "keys")
    registry = Registry(f"sqlite+aiosqlite:///{tmp_path / 'bridge' / 'registry.db'}")
    await registry.create()
    await registry.close()
    with _influx_database(influxdb_session, "check_ok") as db:
        extra = (
            f'[ota]\nsigning_key = "{key.private_path}"\n'
            f'[drift]\nreference_models = ["{demo_models["edge"].path}"]\n'
            f'[influx]\nurl = "{influxdb_session.url}"\napi = "v1"\ndatabase = "{db}"\n'
        )
        checks = await bridge_diagnose(bridge_config(tmp_path, demo_models["cloud"].path, mosquitto.port, extra=extra))
        assert not [f for f in checks.findings if f.status != "ok"], [f.line() for f in checks.findings]
        assert influxdb_session.query("SELECT count(ok) FROM bridge_check", db)  # the probe point is there
    found = by_name(checks)
    assert key.key_id in found["signing key"].found and "layout up to date" in found["registry"].found
    assert "delivers" in found["shared subscription"].found
    out = await cli("cloud_bridge.cli", tmp_path / "cloud.toml")
    # The database is gone now: the CLI reports that, one line per check, and exits 1.
    assert out.returncode == 1 and out.stderr == "", out.stderr
    assert len(out.stdout.splitlines()) == len(checks.findings) + 1
    assert "fail  tsdb" in out.stdout and "database not found" in out.stdout


async def test_bridge_tsdb_without_the_database(
    tmp_path: Path, mosquitto: Mosquitto, influxdb_session: InfluxDB, demo_models: dict[str, DemoModel]
) -> None:
    extra = f'[influx]\nurl = "{influxdb_session.url}"\napi = "v1"\ndatabase = "nowhere"\n'
    found = by_name(
        await bridge_diagnose(bridge_config(tmp_path, demo_models["cloud"].path, mosquitto.port, extra=extra))
    )
    tsdb = found["tsdb"]
    assert tsdb.status == "fail" and "404" in tsdb.found and "database not found" in tsdb.found
    assert "CREATE DATABASE" in tsdb.fix


async def test_bridge_public_key_as_signing_key(
    tmp_path: Path, mosquitto: Mosquitto, demo_models: dict[str, DemoModel]
) -> None:
    key = generate(tmp_path / "keys")
    extra = f'[ota]\nsigning_key = "{key.public_path}"\n'
    found = by_name(
        await bridge_diagnose(bridge_config(tmp_path, demo_models["cloud"].path, mosquitto.port, extra=extra))
    )
    assert found["signing key"].status == "fail" and str(key.public_path) in found["signing key"].found
    assert "cloud-bridge keys generate" in found["signing key"].fix


async def test_bridge_registry_behind_is_reported_and_left_alone(
    tmp_path: Path, mosquitto: Mosquitto, demo_models: dict[str, DemoModel]
) -> None:
    db = tmp_path / "bridge" / "registry.db"
    registry = Registry(f"sqlite+aiosqlite:///{db}")
    await registry.create()
    await registry.close()
    with sqlite3.connect(db) as conn:  # as a registry made before status_order existed
        conn.execute("ALTER TABLE devices DROP COLUMN status_order")
        conn.execute("DROP TABLE rollout_devices")
    found = by_name(await bridge_diagnose(bridge_config(tmp_path, demo_models["cloud"].path, mosquitto.port)))
    assert found["registry"].status == "warn" and "will be migrated at start" in found["registry"].fix
    assert "devices.status_order is missing" in found["registry"].found
    assert "table rollout_devices is missing" in found["registry"].found
    with sqlite3.connect(db) as conn:  # inspected, not changed
        columns = {row[1] for row in conn.execute("PRAGMA table_info(devices)")}
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "status_order" not in columns and "rollout_devices" not in tables


async def test_bridge_wrong_password_skips_the_shared_subscription(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, demo_models: dict[str, DemoModel]
) -> None:
    broker = password_broker(mosquitto_factory, tmp_path, "cloud-bridge", "right")
    mqtt = 'username = "cloud-bridge"\npassword = "wrong"\n'
    found = by_name(await bridge_diagnose(bridge_config(tmp_path, demo_models["cloud"].path, broker.port, mqtt=mqtt)))
    assert found["mqtt login"].status == "fail" and "refused the credentials" in found["mqtt login"].found
    assert found["shared subscription"].status == "skip"


async def test_bridge_shared_subscription_starved_by_the_acl(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, demo_models: dict[str, DemoModel]
) -> None:
    passwords, acl = tmp_path / "passwords", tmp_path / "acl"
    write_passwords(passwords, ("cloud-bridge", "pw"))
    acl.write_text("user cloud-bridge\ntopic readwrite fleet/+/+/telemetry\n", encoding="utf-8")
    broker = mosquitto_factory(allow_anonymous=False, extra_conf=f"password_file {passwords}\nacl_file {acl}\n")
    mqtt = 'username = "cloud-bridge"\npassword = "pw"\n'
    config = bridge_config(tmp_path, demo_models["cloud"].path, broker.port, mqtt=mqtt)
    found = by_name(await bridge_diagnose(config))
    assert found["mqtt login"].status == "ok"
    # Mosquitto grants the subscription and then delivers nothing its ACL denies: the probe sees silence.
    # The bridge would fall back to plain subscriptions ([fleet] shared_fallback, on by default): a warning.
    shared = found["shared subscription"]
    assert shared.status == "warn" and "did not arrive" in shared.found and "mosquitto/acl" in shared.fix
    assert "shared_fallback = true" in shared.found
    config = bridge_config(
        tmp_path, demo_models["cloud"].path, broker.port, mqtt=mqtt, extra="[fleet]\nshared_fallback = false\n"
    )
    shared = by_name(await bridge_diagnose(config))["shared subscription"]
    assert shared.status == "fail" and "did not arrive" in shared.found


async def test_bridge_escalation_session_on_the_main_login_is_found_out(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, demo_models: dict[str, DemoModel]
) -> None:
    """With the username as client id (mosquitto/cloud.conf), an escalation session logging in as the
    [mqtt] user would take over the bridge's main session (and back, forever): a failure with the fix.
    With an account of its own it passes, its $share probe included."""
    passwords = write_passwords(tmp_path / "passwords", ("cloud-bridge", "pw"), ("cloud-bridge-esc", "pw2"))
    broker = mosquitto_factory(start=False, allow_anonymous=False, extra_conf=f"password_file {passwords}\n")
    port = broker.add_listener(lines=("use_username_as_clientid true",))  # a listener option
    broker.start()
    mqtt = 'username = "cloud-bridge"\npassword = "pw"\n'
    found = by_name(await bridge_diagnose(bridge_config(tmp_path, demo_models["cloud"].path, port, mqtt=mqtt)))
    assert found["mqtt login"].status == "ok" and found["shared subscription"].status == "ok"
    esc = found["escalation session"]
    assert esc.status == "fail" and "use_username_as_clientid" in esc.found
    assert "[escalation] username" in esc.fix and 'session = "shared"' in esc.fix
    own = 'username = "cloud-bridge-esc"\npassword = "pw2"\n'  # lands in [escalation]
    config = bridge_config(tmp_path, demo_models["cloud"].path, port, mqtt=mqtt, extra=own)
    esc = by_name(await bridge_diagnose(config))["escalation session"]
    assert esc.status == "ok" and "delivers" in esc.found
    config = bridge_config(tmp_path, demo_models["cloud"].path, port, mqtt=mqtt, extra='session = "shared"\n')
    esc = by_name(await bridge_diagnose(config))["escalation session"]
    assert esc.status == "ok" and "no session of its own" in esc.found


async def test_bridge_closed_broker_port(tmp_path: Path, demo_models: dict[str, DemoModel]) -> None:
    checks = await bridge_diagnose(bridge_config(tmp_path, demo_models["cloud"].path, free_port()))
    assert statuses(checks)["broker reachable"] == "fail"
    assert statuses(checks)["mqtt login"] == "skip" and statuses(checks)["shared subscription"] == "skip"
    assert statuses(checks)["tsdb"] == "ok"  # not configured
