"""MQTT: a login as the program makes it (CONNACK), and the connection the later checks use."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from common.checks.network import NETWORK_FIX
from common.checks.report import Finding
from common.mqtt import Failure, LoopDriver, classify_connack, classify_error, connect_properties, new_client

_LOGIN_FIX = {
    "auth": "check {section} username and password (the broker's password file: mosquitto_passwd)",
    "protocol": 'the broker does not speak this MQTT version: set {section} protocol = "mqtt311"',
    "broker": "read the broker's log for why it refused the client",
    "tls": "check {section} tls_ca, tls_cert and tls_key",
}


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    properties: Properties | None


class MqttProbe:
    """One logged-in MQTT connection for the checks: subscribe, publish QoS 1, wait for a message.

    Its client id is the program's with a random suffix, so that it does not take over the running
    program's session (clean start, no session kept).
    """

    def __init__(self, client: mqtt.Client, driver: LoopDriver, v5: bool) -> None:
        self.client = client
        self.v5 = v5
        self._driver = driver
        self._loop = asyncio.get_running_loop()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._messages: asyncio.Queue[Received] = asyncio.Queue()
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish

    @classmethod
    async def connect(
        cls,
        *,
        host: str,
        port: int,
        client_id: str,
        username: str | None,
        password: str | None,
        tls: ssl.SSLContext | None,
        v5: bool,
        timeout_s: float = 10.0,
    ) -> MqttProbe | Failure:
        """Log in; the connection, or why the broker (or the network) refused it."""
        probe_id = f"{client_id}-check-{uuid.uuid4().hex[:6]}"
        client = new_client(
            client_id=probe_id,
            v5=v5,
            persistent=False,
            username=username,
            password=password,
            tls=tls,
            connect_timeout_s=timeout_s,
        )
        loop = asyncio.get_running_loop()
        connack: asyncio.Future[ReasonCode] = loop.create_future()

        def on_connect(_c: mqtt.Client, _u: Any, _flags: Any, reason: ReasonCode, _props: Any) -> None:
            if not connack.done():
                connack.set_result(reason)

        def on_closed() -> None:
            if not connack.done():
                connack.set_exception(ConnectionResetError("the broker closed the connection before its CONNACK"))

        client.on_connect = on_connect
        driver = LoopDriver(client, misc_interval_s=1.0, reads_per_wakeup=16, on_closed=on_closed)
        props = connect_properties(session_expiry_s=0) if v5 else None
        try:
            await driver.connect(host, port, 30, clean_start=True if v5 else None, properties=props)
            async with asyncio.timeout(timeout_s):
                reason = await connack
        except TimeoutError as exc:
            driver.abort()
            return classify_error(exc)
        except OSError as exc:
            driver.abort()
            return classify_error(exc)
        if reason.is_failure:
            driver.abort()
            return classify_connack(reason)
        return cls(client, driver, v5)

    async def subscribe(self, topic: str, timeout_s: float = 5.0) -> bool:
        """Subscribe at QoS 1; False when the broker refused (e.g. its ACL)."""
        result, mid = self.client.subscribe(topic, qos=1)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return False
        granted: list[ReasonCode] = await self._wait(mid, timeout_s)
        return not any(r.is_failure for r in granted)

    async def publish(
        self, topic: str, payload: bytes, *, properties: Properties | None = None, timeout_s: float = 5.0
    ) -> None:
        """Publish at QoS 1 and wait for the PUBACK."""
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        await self._wait(info.mid, timeout_s)

    async def receive(self, match: Callable[[Received], bool], timeout_s: float) -> Received | None:
        """The first message `match` accepts within `timeout_s`, else None."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    message = await self._messages.get()
                    if match(message):
                        return message
        except TimeoutError:
            return None

    async def close(self) -> None:
        if self._driver.attached:
            self.client.disconnect()
            await asyncio.sleep(0)  # let the loop write the DISCONNECT
        self._driver.abort()

    async def _wait(self, mid: int, timeout_s: float) -> Any:
        future = self._pending.setdefault(mid, self._loop.create_future())
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        finally:
            self._pending.pop(mid, None)

    def _done(self, mid: int, value: Any) -> None:
        future = self._pending.setdefault(mid, self._loop.create_future())
        if not future.done():
            future.set_result(value)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        self._done(mid, list(reasons))

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _reason: Any, _p: Any) -> None:
        self._done(mid, None)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.qos > 0:
            client.ack(msg.mid, msg.qos)
        self._messages.put_nowait(Received(msg.topic, bytes(msg.payload), getattr(msg, "properties", None)))


def login_finding(name: str, result: MqttProbe | Failure, who: str, section: str) -> Finding:
    """The finding of an MQTT login (`who`: the user and broker, for the message)."""
    if isinstance(result, MqttProbe):
        version = "MQTT 5" if result.v5 else "MQTT 3.1.1"
        return Finding(name, "ok", f"{who}: login accepted ({version})")
    fix = _LOGIN_FIX.get(result.kind) or NETWORK_FIX.get(result.kind, NETWORK_FIX["network"])
    return Finding(name, "fail", f"{who}: {result.detail}", fix.format(section=section, where=who))
