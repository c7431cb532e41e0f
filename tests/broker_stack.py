"""The shipped production brokers (mosquitto/cloud.conf, mosquitto/gateway.conf) started for tests.

Credentials come from the shipped generator (scripts/gen-certs.sh, the `pki` fixture of tests/pki.py);
the configs are rendered by devservers.mosquitto_conf with only paths, ports and the bridge address
changed.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cloud_bridge.config import BridgeConfig, MqttConfig
from devservers import Mosquitto, free_ports
from devservers.mosquitto_conf import ShippedConfig
from tests.pki import BRIDGE, GATEWAY, REPO, Pki
from tests.plugin_servers import MosquittoFactory
from tests.poll import wait_for

MOSQUITTO_DIR = REPO / "mosquitto"
SHIPPED_CLOUD_ADDRESS = "cloud-broker.example.net:8884"


@dataclass
class CloudBroker:
    broker: Mosquitto
    tls_port: int
    gateway_port: int

    @property
    def loopback_port(self) -> int:
        return self.broker.port


def start_cloud(factory: MosquittoFactory, pki: Pki, name: str = "cloud") -> CloudBroker:
    main_port, tls_port, gateway_port = free_ports(3)
    rendered = ShippedConfig(
        MOSQUITTO_DIR / "cloud.conf",
        files={
            "/mosquitto/certs/ca.crt": pki.ca,
            "/mosquitto/certs/server.crt": pki.dir / "server.crt",
            "/mosquitto/certs/server.key": pki.dir / "server.key",
            "/mosquitto/certs/passwd": pki.dir / "passwd",
            "/mosquitto/config/acl": MOSQUITTO_DIR / "acl",
        },
        main_port=1883,
        ports={8883: tls_port, 8884: gateway_port},
    )
    return CloudBroker(factory(name=name, config_renderer=rendered, port=main_port), tls_port, gateway_port)


def start_gateway(
    factory: MosquittoFactory,
    pki: Pki,
    cloud_address: str,
    name: str = "gateway",
    source: Path = MOSQUITTO_DIR / "gateway.conf",
    expect_drops: bool = False,
) -> Mosquitto:
    """The gateway broker; `source` replaces the shipped file only for a test of a rejected alternative
    or of a deliberately small queue (`expect_drops`: its log may say it dropped messages)."""
    rendered = ShippedConfig(
        source,
        files={
            "/mosquitto/certs/ca.crt": pki.ca,
            "/mosquitto/certs/gateway.crt": pki.dir / "gateways" / f"{GATEWAY}.crt",
            "/mosquitto/certs/gateway.key": pki.dir / "gateways" / f"{GATEWAY}.key",
            "/mosquitto/certs/passwd": pki.dir / "passwd",
            "/mosquitto/config/acl": MOSQUITTO_DIR / "acl",
        },
        main_port=1883,
        addresses={SHIPPED_CLOUD_ADDRESS: cloud_address},
    )
    return factory(name=name, config_renderer=rendered, expect_drops=expect_drops)


def cloud_bridge_config(tmp_path: Path, tls_port: int, pki: Pki, **sections: Any) -> BridgeConfig:
    """The cloud bridge on the cloud broker's TLS listener, with its own account; `sections` as
    BridgeConfig takes them."""
    mqtt = MqttConfig(
        host="127.0.0.1",
        port=tls_port,
        client_id=BRIDGE,
        username=BRIDGE,
        password=pki.password(BRIDGE),
        tls_ca=str(pki.ca),
    )
    return BridgeConfig(state_dir=str(tmp_path / "bridge"), mqtt=mqtt, **sections)


@dataclass
class Client:
    """A paho MQTT 5 client that records CONNACK, SUBACK and messages; blocking helpers with timeouts."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    ca: Path | None = None
    client_id: str = ""
    clean_start: bool = True
    # > 0 with clean_start False: a persistent MQTT 5 session the broker keeps while the client is away.
    session_expiry_s: int = 0
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    connack: ReasonCode | None = None
    suback: list[ReasonCode] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        if self.username is not None:
            self.client.username_pw_set(self.username, self.password)
        if self.ca is not None:
            self.client.tls_set_context(ssl.create_default_context(cafile=str(self.ca)))
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self._closed = False

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        with self._cond:
            self.connack = rc
            self._cond.notify_all()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: list[ReasonCode], props: Any) -> None:
        with self._cond:
            self.suback = list(rcs)
            self._cond.notify_all()

    def connect(self, timeout: float = 10.0) -> ReasonCode:
        """Connect and wait for CONNACK; return its reason code.

        Raises OSError/SSLError when the socket or TLS handshake fails, ConnectionError when the broker
        closes the connection without a CONNACK (e.g. plain MQTT sent to a TLS port).
        """
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self.session_expiry_s:
            props.SessionExpiryInterval = self.session_expiry_s
        with self._cond:
            self.connack = None
            self._closed = False
        self.client.connect(self.host, self.port, keepalive=30, clean_start=self.clean_start, properties=props)
        self.client.loop_start()
        with self._cond:
            if not self._cond.wait_for(lambda: self.connack is not None or self._closed, timeout):
                raise AssertionError(f"no CONNACK from {self.host}:{self.port} in {timeout} s")
            if self.connack is None:
                raise ConnectionError(f"{self.host}:{self.port} closed the connection without a CONNACK")
            return self.connack

    def subscribe(self, topic: str, timeout: float = 10.0) -> list[ReasonCode]:
        with self._cond:
            self.suback = []
        self.client.subscribe(topic, qos=1)
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self.suback), timeout):
                raise AssertionError(f"no SUBACK for {topic}")
            return list(self.suback)

    def publish(self, topic: str, payload: bytes, timeout: float = 10.0) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout)
        assert info.is_published(), f"no PUBACK for {topic} in {timeout} s"

    def wait_for(self, predicate: Callable[[list[tuple[str, bytes]]], bool], timeout: float = 10.0) -> None:
        """Block until `predicate(messages so far)` holds; AssertionError after `timeout` seconds."""
        if not self.holds_within(predicate, timeout):
            raise AssertionError(f"condition not met in {timeout} s; received {self.received()[:5]}")

    def holds_within(self, predicate: Callable[[list[tuple[str, bytes]]], bool], timeout: float) -> bool:
        """Whether `predicate(messages so far)` holds within `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.messages), timeout)

    def wait_messages(self, count: int, timeout: float = 10.0) -> list[tuple[str, bytes]]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError(f"got {len(self.messages)} messages, expected {count}: {self.messages[:5]}")
            return list(self.messages)

    def received(self) -> list[tuple[str, bytes]]:
        """A snapshot of (topic, payload) received so far."""
        with self._cond:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


PROBE_TOPIC = "fleet/probe/probe/cmd"


def wait_bridged(local: Client, cloud: Client, timeout: float) -> None:
    """Wait until the gateway's bridge has subscribed on the cloud: a probe sent by `cloud` reaches
    `local` (connected to the gateway). Until then the cloud drops commands (nobody subscribed to
    them), so the probe is sent again until one arrives."""
    local.subscribe(PROBE_TOPIC)

    def probe_arrives() -> bool:
        cloud.publish(PROBE_TOPIC, b"probe")
        return local.holds_within(lambda got: any(topic == PROBE_TOPIC for topic, _ in got), 0.5)

    wait_for(probe_arrives, timeout, "the gateway bridge to subscribe on the cloud", interval=0)
