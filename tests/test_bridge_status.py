"""Online/offline from the retained status topic, with shared subscriptions on (the default).

MQTT 5 (4.8.2) says retained messages are not sent to a shared subscription, so status must be
subscribed without `$share`. Mosquitto 2.0.11 (here) does send them anyway, so the late-start test
alone would not catch a regression on this broker; the two-bridge test does: under `$share` each
status reaches one bridge of the group only, and the other never learns the device is online.
Devices are real processes holding a real MQTT connection with a last will; "going offline" is a
`kill -9` of that process."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import aiomqtt
import pytest

from cloud_bridge.app import Bridge, running_bridge
from cloud_bridge.config import BridgeConfig, FleetConfig, MqttConfig
from cloud_bridge.ingest.admission import ingest_filters
from cloud_bridge.registry import Device, TelemetryRow
from devservers import ManagedProcess, Mosquitto
from schemas import Telemetry, encode
from schemas.topics import Channel, Topics
from tests.factories import examples
from tests.poll import wait_for_async
from tests.processes import running, wait_logged

pytestmark = pytest.mark.timeout(60)

TOPICS = Topics("fleet")
FLEET = "f1"
POLL_S = 0.05
LIMIT_S = 15.0

# A device as small as it gets: one MQTT 5 connection with a retained "offline" last will, a
# retained "online" birth, then it idles until it is killed (or its stdin closes).
DEVICE = """
import sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from schemas import Status, encode, new_msg_id
from schemas.topics import Channel, Topics

host, port, fleet, device = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
topic = Topics("fleet").device(fleet, device, Channel.STATUS)

def status(state, reason):
    return encode(Status(msg_id=new_msg_id(), fleet_id=fleet, device_id=device, ts=time.time(),
                         state=state, reason=reason))

client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
client.will_set(topic, status("offline", "connection_lost"), qos=1, retain=True)
client.connect(host, port, keepalive=30)
client.loop_start()
info = client.publish(topic, status("online", "connected"), qos=1, retain=True)
info.wait_for_publish(10)
if not info.is_published():
    sys.exit("birth message not acknowledged")
print("ready", flush=True)
sys.stdin.read()
"""


@contextmanager
def devices(broker: Mosquitto, names: list[str]) -> Iterator[dict[str, ManagedProcess]]:
    """Start one device process per name and wait until each has its retained birth acknowledged."""
    procs: dict[str, ManagedProcess] = {}
    with ExitStack() as stack:
        for name in names:
            argv = [sys.executable, "-c", DEVICE, broker.host, str(broker.port), FLEET, name]
            procs[name] = stack.enter_context(running(name, argv, broker.work_dir / f"{name}.log", stdin_pipe=True))
        for proc in procs.values():
            wait_logged(proc, "ready", LIMIT_S)
        yield procs


def config(tmp_path: Path, broker: Mosquitto, name: str) -> BridgeConfig:
    return BridgeConfig(
        state_dir=str(tmp_path / name),
        mqtt=MqttConfig(host=broker.host, port=broker.port, client_id=name),
        fleet=FleetConfig(shared=True, share_group="bridges"),
    )


async def online_map(bridge: Bridge) -> dict[str, bool]:
    return {row["device_id"]: bool(row["online"]) for row in await bridge.registry.rows(Device)}


async def wait_online(bridge: Bridge, expected: dict[str, bool]) -> None:
    await wait_for_async(
        lambda: online_map(bridge),
        LIMIT_S,
        f"{bridge.config.mqtt.client_id}: the registry to show {expected}",
        until=lambda shown: shown == expected,
        interval=POLL_S,
    )


def test_status_is_subscribed_without_share_and_the_rest_with_it() -> None:
    filters = ingest_filters(TOPICS, "bridges", shared=True)
    assert TOPICS.filter(Channel.STATUS) in filters
    assert not any(f.startswith("$share/") and f.endswith("/status") for f in filters)
    assert Topics.shared("bridges", TOPICS.filter(Channel.TELEMETRY)) in filters
    assert all(not f.startswith("$share/") for f in ingest_filters(TOPICS, "bridges", shared=False))


async def test_bridge_started_after_devices_learns_online_from_retained_status_and_records_last_will(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    names = ["dev-a", "dev-b", "dev-c"]
    with devices(mosquitto, names) as procs:
        # The births were published (retained) before any bridge existed.
        async with running_bridge(config(tmp_path, mosquitto, "bridge-late")) as bridge:
            await wait_online(bridge, dict.fromkeys(names, True))
            procs["dev-b"].kill()  # no DISCONNECT: the broker publishes the last will
            await wait_online(bridge, {"dev-a": True, "dev-b": False, "dev-c": True})
            assert bridge.ingestor is not None and bridge.ingestor.stats.dead_letters == 0


async def test_every_bridge_of_a_share_group_sees_every_status_but_telemetry_is_split(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    windows = [t for d in ("dev-x", "dev-y") * 10 for t in examples(FLEET, d) if isinstance(t, Telemetry)]
    async with (
        running_bridge(config(tmp_path, mosquitto, "bridge-1")) as one,
        running_bridge(config(tmp_path, mosquitto, "bridge-2")) as two,
    ):
        with devices(mosquitto, ["dev-x", "dev-y"]) as procs:
            both = {"dev-x": True, "dev-y": True}
            await wait_online(one, both)
            await wait_online(two, both)
            async with aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
                for message in windows:
                    topic = TOPICS.device(FLEET, message.device_id, Channel.TELEMETRY)
                    await client.publish(topic, encode(message), qos=1)

            async def split() -> tuple[int, int]:
                return await one.registry.count(TelemetryRow), await two.registry.count(TelemetryRow)

            await wait_for_async(
                split,
                LIMIT_S,
                f"{len(windows)} telemetry windows stored by the two bridges in all",
                until=lambda stored: sum(stored) >= len(windows),
                interval=POLL_S,
            )
            stored = await split()
            procs["dev-y"].kill()
            await wait_online(one, {"dev-x": True, "dev-y": False})
            await wait_online(two, {"dev-x": True, "dev-y": False})
    # Telemetry went to the share group: each window to exactly one bridge, and both got some.
    assert sum(stored) == len(windows)
    assert min(stored) > 0
