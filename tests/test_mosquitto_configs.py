"""The shipped cloud broker config (mosquitto/cloud.conf + mosquitto/acl) on a real mosquitto.

Credentials from the shipped scripts/gen-certs.sh; the config rendered with only paths and ports changed
(devservers.mosquitto_conf). Denied traffic is checked deterministically: a client's messages reach a
subscriber in order, so once a marker published after the denied message has arrived, the denied one
would have arrived before it.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devservers import MosquittoError
from devservers.mosquitto_conf import ShippedConfig
from schemas.codec import LARGEST_MESSAGE
from tests.broker_stack import MOSQUITTO_DIR, Client, start_cloud
from tests.pki import BRIDGE, Pki, make_pki
from tests.plugin_servers import MosquittoFactory

pytestmark = pytest.mark.timeout(60)


def _device(port: int, pki: Pki, name: str) -> Client:
    return Client("127.0.0.1", port, name, pki.password(name), pki.ca, client_id=f"edge-{name}")


def _options(conf: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in conf.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("name", ["cloud.conf", "gateway.conf"])
def test_shipped_limits_are_deliberate(name: str) -> None:
    """docs/traps.md #1 and the wire contract: queues raised and bounded, payload limit = codec limit."""
    opts = _options(MOSQUITTO_DIR / name)
    assert int(opts["max_queued_messages"][0]) >= 100_000
    assert int(opts["max_queued_bytes"][0]) > 0, "the queue must be bounded in bytes (RAM)"
    assert int(opts["message_size_limit"][0]) == LARGEST_MESSAGE
    assert opts["persistence"] == ["true"]
    assert opts["allow_anonymous"][0] == "false"


def test_tls_connect_with_the_generated_ca(mosquitto_factory: MosquittoFactory, pki: Pki) -> None:
    cloud = start_cloud(mosquitto_factory, pki)
    with _device(cloud.tls_port, pki, "dev-a") as client:
        assert client.connect() == 0
    # The broker replaced the client id with the username (use_username_as_clientid).
    assert "as dev-a (p5" in cloud.broker.log_text()


def test_plain_mqtt_to_the_tls_port_fails(mosquitto_factory: MosquittoFactory, pki: Pki) -> None:
    cloud = start_cloud(mosquitto_factory, pki)
    plain = Client("127.0.0.1", cloud.tls_port, "dev-a", pki.password("dev-a"))
    try:
        with pytest.raises(ConnectionError):
            plain.connect()
        assert plain.connack is None
    finally:
        plain.close()


def test_tls_without_the_ca_fails_verification(mosquitto_factory: MosquittoFactory, pki: Pki) -> None:
    cloud = start_cloud(mosquitto_factory, pki)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.tls_set_context(ssl.create_default_context())  # system CAs only: the test CA is unknown
    with pytest.raises(ssl.SSLCertVerificationError):
        client.connect("127.0.0.1", cloud.tls_port)


@pytest.mark.parametrize(("user", "password"), [("dev-a", "wrong"), ("nobody", "x"), (None, None)])
def test_bad_credentials_are_refused(
    mosquitto_factory: MosquittoFactory, pki: Pki, user: str | None, password: str | None
) -> None:
    cloud = start_cloud(mosquitto_factory, pki)
    with Client("127.0.0.1", cloud.tls_port, user, password, pki.ca) as client:
        rc = client.connect()
    assert rc.is_failure and rc.getName() in ("Not authorized", "Bad user name or password"), rc


def test_gateway_listener_requires_a_client_certificate(mosquitto_factory: MosquittoFactory, pki: Pki) -> None:
    cloud = start_cloud(mosquitto_factory, pki)
    # A password alone is not enough on the gateway listener (require_certificate true).
    client = Client("127.0.0.1", cloud.gateway_port, BRIDGE, pki.password(BRIDGE), pki.ca)
    try:
        # The TLS handshake fails (no certificate) or the broker drops the connection right after it.
        with pytest.raises((ConnectionError, OSError)):
            client.connect()
        assert client.connack is None or client.connack.is_failure
    finally:
        client.close()


def test_device_cannot_publish_as_another_device(mosquitto_factory: MosquittoFactory, pki: Pki) -> None:
    cloud = start_cloud(mosquitto_factory, pki)
    with (
        Client("127.0.0.1", cloud.tls_port, BRIDGE, pki.password(BRIDGE), pki.ca) as watcher,
        _device(cloud.tls_port, pki, "dev-a") as dev_a,
    ):
        assert watcher.connect() == 0
        watcher.subscribe("fleet/#")
        assert dev_a.connect() == 0
        # QoS 1 publishes to a denied topic are acknowledged (MQTT 3.1.1 has no way to say no) but dropped.
        for channel in ("results", "telemetry", "status", "cmd/ack", "samples"):
            dev_a.publish(f"fleet/f1/dev-b/{channel}", b"spoofed")
        dev_a.publish("fleet/f1/dev-a/results", b"own")
        got = watcher.wait_messages(1)
    assert got == [("fleet/f1/dev-a/results", b"own")]


def test_device_cannot_read_another_devices_commands(mosquitto_factory: MosquittoFactory, pki: Pki) -> None:
    cloud = start_cloud(mosquitto_factory, pki)
    with (
        Client("127.0.0.1", cloud.tls_port, BRIDGE, pki.password(BRIDGE), pki.ca) as bridge,
        _device(cloud.tls_port, pki, "dev-a") as dev_a,
        _device(cloud.tls_port, pki, "dev-b") as dev_b,
    ):
        for client in (bridge, dev_a, dev_b):
            assert client.connect() == 0
        dev_a.subscribe("fleet/f1/dev-b/cmd")
        dev_a.subscribe("fleet/+/+/cmd")
        dev_a.subscribe("fleet/f1/dev-b/input")
        dev_b.subscribe("fleet/f1/dev-b/cmd")
        bridge.publish("fleet/f1/dev-b/cmd", b"for-b")
        bridge.publish("fleet/f1/dev-b/input", b"input-b")
        bridge.publish("fleet/f1/dev-a/cmd", b"for-a")
        # dev-a may read its own command (once per matching subscription), never dev-b's.
        got_a = dev_a.wait_messages(1)
        got_b = dev_b.wait_messages(1)
    assert {payload for _, payload in got_a} == {b"for-a"}
    assert got_b == [("fleet/f1/dev-b/cmd", b"for-b")]


def test_bridge_account_uses_shared_subscriptions(mosquitto_factory: MosquittoFactory, pki: Pki) -> None:
    cloud = start_cloud(mosquitto_factory, pki)
    with (
        Client("127.0.0.1", cloud.tls_port, BRIDGE, pki.password(BRIDGE), pki.ca) as bridge,
        _device(cloud.tls_port, pki, "dev-a") as dev_a,
    ):
        assert bridge.connect() == 0
        assert [rc.value for rc in bridge.subscribe("$share/bridges/fleet/+/+/telemetry")] == [1]
        assert dev_a.connect() == 0
        dev_a.publish("fleet/f1/dev-a/telemetry", b"t")
        assert bridge.wait_messages(1) == [("fleet/f1/dev-a/telemetry", b"t")]


def test_loopback_listener_serves_the_health_check_only(mosquitto_factory: MosquittoFactory, pki: Pki) -> None:
    cloud = start_cloud(mosquitto_factory, pki)
    with (
        Client("127.0.0.1", cloud.loopback_port) as anonymous,
        _device(cloud.tls_port, pki, "dev-a") as dev_a,
    ):
        assert anonymous.connect() == 0
        anonymous.subscribe("fleet/#")
        anonymous.subscribe("$SYS/broker/uptime")
        assert dev_a.connect() == 0
        dev_a.publish("fleet/f1/dev-a/results", b"hidden")
        # The retained uptime arrives at once; the next one (every sys_interval, 10 s) is published by the
        # broker after it handled dev-a's acknowledged publish, so "hidden" would have arrived before it.
        got = anonymous.wait_messages(2, timeout=25)
    assert [topic for topic, _ in got] == ["$SYS/broker/uptime", "$SYS/broker/uptime"]
    # The plain listener is bound to loopback only in the shipped file.
    assert re.search(r"^listener 1883 127\.0\.0\.1$", (MOSQUITTO_DIR / "cloud.conf").read_text(), re.M)


def test_renderer_names_an_unmapped_container_path(mosquitto_factory: MosquittoFactory, pki: Pki) -> None:
    rendered = ShippedConfig(MOSQUITTO_DIR / "cloud.conf", files={}, main_port=1883, ports={8883: 1, 8884: 2})
    broker = mosquitto_factory(name="unmapped", start=False, config_renderer=rendered)
    with pytest.raises(MosquittoError, match=r"cloud\.conf:\d+: container path /mosquitto/certs/ca\.crt"):
        broker.render_config()


def test_gen_certs_reruns_keep_existing_credentials(tmp_path: Path) -> None:
    first = make_pki(tmp_path / "pki", ["dev-a"])
    ca = first.ca.read_bytes()
    second = make_pki(tmp_path / "pki", ["dev-a", "dev-c"])
    assert second.ca.read_bytes() == ca, "a rerun must not replace the CA devices already trust"
    assert second.password("dev-a") == first.password("dev-a")
    assert set(second.passwords) == {BRIDGE, "dev-a", "dev-c"}
    users = [line.split(":", 1)[0] for line in (second.dir / "passwd").read_text().splitlines()]
    assert sorted(users) == sorted([BRIDGE, "dev-a", "dev-c"])
    assert (second.dir / "ca.key").stat().st_mode & 0o077 == 0, "the CA key must be private"
