"""A device behind a gateway (mosquitto/gateway.conf) bridged to the cloud broker (mosquitto/cloud.conf).

Two real brokers with the shipped configs, the shipped ACL and credentials from scripts/gen-certs.sh; the
gateway reaches the cloud through a TcpProxy standing in for the LTE link, over mutual TLS. A real edge
node publishes to the gateway and a real cloud bridge ingests on the cloud side. The gateway-to-cloud
link is black-holed (a dead radio link) so the gateway's queue fills, then the device's own link is cut
(reset, then refused) so its outbox fills; both come back and everything the node produced must be in
the bridge's registry exactly once (the bridge drops the duplicates re-sent after the dead link by
msg_id). Commands (over a reset and refused link) and escalation replies travel the other way.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from pathlib import Path

import pytest

from cloud_bridge.app import running_bridge
from cloud_bridge.config import EscalationConfig
from cloud_bridge.registry import ResultRow, TelemetryRow
from demokit.models import DemoModel, build_model, load_split
from demokit.models import edge_config as edge_train_config
from devservers import Mosquitto, TcpProxy
from schemas import Results, Topics, decode_for_topic
from tests.broker_stack import MOSQUITTO_DIR, Client, cloud_bridge_config, start_cloud, start_gateway, wait_bridged
from tests.edge_harness import RunningNode, edge_config
from tests.pki import BRIDGE, Pki
from tests.plugin_servers import MosquittoFactory, TcpProxyFactory
from tests.poll import wait_for_async

pytestmark = pytest.mark.timeout(90)

DEVICE = "dev-1"
SHIPPED_GATEWAY = MOSQUITTO_DIR / "gateway.conf"
_POLL_S = 0.1


@pytest.fixture(scope="module")
def edge_model(tmp_path_factory: pytest.TempPathFactory) -> DemoModel:
    """Only the small edge model: training the cloud model too would double the setup on a busy machine."""
    return build_model(tmp_path_factory.mktemp("models"), edge_train_config(seed=0), load_split())


def _split(inference_id: str) -> tuple[str, int]:
    boot, seq = inference_id.rsplit("-", 1)
    return boot, int(seq)


@functools.cache
def _answer_keys(topic: str, payload: bytes) -> tuple[tuple[str, int], ...]:
    """(msg_id, place) of each answer in one results message (the registry's key for its row),
    decoded once however often a predicate looks at it."""
    message = decode_for_topic(Topics(), topic, payload)
    assert isinstance(message, Results), f"{topic}: {type(message).__name__}, not result/2"
    return tuple((message.msg_id, i) for i in range(len(message.answers)))


def _answers(messages: list[tuple[str, bytes]]) -> set[tuple[str, int]]:
    """Distinct answers in these results messages (a redelivered copy has the same msg_id)."""
    return {key for topic, payload in messages if topic.endswith("/results") for key in _answer_keys(topic, payload)}


def _gateway_results(watcher: Client) -> set[tuple[str, int]]:
    """Distinct answers the gateway accepted."""
    return _answers(watcher.received())


def _outbox_results(path: Path) -> set[str]:
    """msg_ids of the results messages left in a stopped node's outbox file (plain sqlite3)."""
    conn = sqlite3.connect(path)
    try:
        return {row[0] for row in conn.execute("SELECT msg_id FROM outbox WHERE topic LIKE '%/results'")}
    finally:
        conn.close()


def _outbox_answers(path: Path) -> set[tuple[str, int]]:
    """The answers in the results messages of a node's outbox file (read while it runs: WAL)."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT topic, payload FROM outbox WHERE topic LIKE '%/results'").fetchall()
    finally:
        conn.close()
    return {key for topic, payload in rows for key in _answer_keys(topic, payload)}


def _cut(proxy: TcpProxy) -> None:
    """A link goes down: live connection reset, reconnects refused."""
    proxy.refuse()
    proxy.reset()


def _stack(
    factory: MosquittoFactory, tcp_proxy: TcpProxyFactory, pki: Pki, gateway_conf: Path = SHIPPED_GATEWAY
) -> tuple[int, TcpProxy, Mosquitto]:
    cloud = start_cloud(factory, pki)
    link = tcp_proxy("127.0.0.1", cloud.gateway_port)
    gateway = start_gateway(factory, pki, f"127.0.0.1:{link.port}", source=gateway_conf)
    _wait_bridge_subscribed(cloud.tls_port, gateway.port, pki)
    return cloud.tls_port, link, gateway


def _wait_bridge_subscribed(cloud_port: int, gateway_port: int, pki: Pki, timeout: float = 20.0) -> None:
    """Wait until the gateway's bridge has subscribed on the cloud: a cloud command reaches the gateway."""
    with (
        Client("127.0.0.1", gateway_port, BRIDGE, pki.password(BRIDGE)) as local,
        Client("127.0.0.1", cloud_port, BRIDGE, pki.password(BRIDGE), pki.ca) as cloud,
    ):
        assert local.connect() == 0 and cloud.connect() == 0
        wait_bridged(local, cloud, timeout)


async def test_edge_node_behind_gateway_loses_nothing_while_the_link_is_cut(
    mosquitto_factory: MosquittoFactory,
    tcp_proxy: TcpProxyFactory,
    pki: Pki,
    edge_model: DemoModel,
    tmp_path: Path,
) -> None:
    cloud_port, link, gateway = _stack(mosquitto_factory, tcp_proxy, pki)
    bridge_config = cloud_bridge_config(tmp_path, cloud_port, pki)
    # The device's own LTE link to the gateway, cut later so that its outbox has to hold data too.
    device_link = tcp_proxy("127.0.0.1", gateway.port)
    node_config = edge_config(
        tmp_path,
        device_link.port,
        edge_model.path,
        mqtt={"username": DEVICE, "password": pki.password(DEVICE)},
        device={"device_id": DEVICE},
        routing={"escalate": False},
        telemetry={"interval_s": 1.0},
        source={"kind": "replay", "rate_hz": 100.0},
    )
    # Sees what the gateway accepted from the node (the bridge account may read fleet/# there too).
    watcher = Client("127.0.0.1", gateway.port, BRIDGE, pki.password(BRIDGE))
    assert watcher.connect() == 0
    watcher.subscribe("fleet/+/+/results")
    try:
        async with running_bridge(bridge_config) as bridge, RunningNode(node_config) as node:

            def outbox_depth() -> int | None:
                return None if node.outbox is None else node.outbox.depth

            stored = functools.partial(bridge.registry.count, ResultRow)
            await wait_for_async(
                stored, 30, "50 results in the cloud registry", until=lambda n: n >= 50, interval=_POLL_S
            )
            # A dead radio link: the bridge's bytes vanish, its in-flight messages stay unacknowledged.
            await asyncio.to_thread(link.blackhole)
            at_cut = len(await asyncio.to_thread(_gateway_results, watcher))
            await asyncio.to_thread(watcher.wait_for, lambda got: len(_answers(got)) >= at_cut + 200, 20)
            # The gateway accepted 200 more answers and tried to forward them into the dead link.
            assert link.stats().bytes_dropped > 0
            # Now the device loses its link as well: its durable outbox fills.
            await asyncio.to_thread(_cut, device_link)
            outbox_file = tmp_path / "outbox.sqlite"

            def held_back() -> int:
                return len(_outbox_answers(outbox_file) - _gateway_results(watcher))

            # Counted in answers the gateway never saw: results share messages (up to 1 s of them).
            await wait_for_async(
                held_back, 20, "200 undelivered answers in the device outbox", until=lambda n: n >= 200
            )
            # The cloud link returns first (restore resets the dead connection, the bridge reconnects and
            # re-sends its unacknowledged messages: duplicates the cloud bridge drops), then the device's.
            reconnects = link.stats().connections_total
            await asyncio.to_thread(link.restore)
            await asyncio.to_thread(link.wait_until, lambda s: s.connections_total > reconnects, 40)
            await asyncio.to_thread(device_link.restore)
            # The source keeps producing at 100/s: "drained" is a near-empty outbox, the rest goes on stop.
            await wait_for_async(
                outbox_depth,
                30,
                "the device outbox to drain into the gateway",
                until=lambda n: n is not None and n < 20,
            )
        # The node drained its outbox into the gateway on stop, so the gateway has seen everything it
        # produced: what the outbox still holds are messages sent and not confirmed yet (the node
        # stopped within a confirmation round), which a restarted node would send again.
        produced = await asyncio.to_thread(_gateway_results, watcher)
        assert _outbox_results(tmp_path / "outbox.sqlite") <= {msg_id for msg_id, _ in produced}
        async with running_bridge(bridge_config) as bridge:

            async def stored_and_counted() -> tuple[int, int]:
                windows = await bridge.registry.rows(TelemetryRow)
                return await bridge.registry.count(ResultRow), sum(int(row["count"]) for row in windows)

            await wait_for_async(
                stored_and_counted,
                40,
                f"{len(produced)} results and telemetry counting them in the registry (results, counted)",
                until=lambda seen: min(seen) >= len(produced),
                interval=_POLL_S,
            )
            rows = await bridge.registry.rows(ResultRow)
            telemetry = await bridge.registry.rows(TelemetryRow)
    finally:
        watcher.close()
    ids = [row["inference_id"] for row in rows]
    assert len(ids) == len(set(ids)) == len(produced), "every result exactly once"
    seqs = sorted(_split(i)[1] for i in ids)
    assert seqs == list(range(1, len(seqs) + 1)), "no gaps in the node's result sequence"
    assert len({_split(i)[0] for i in ids}) == 1
    # Telemetry windows account for every inference (the last window was flushed on stop).
    assert sum(int(row["count"]) for row in telemetry) == len(ids)


@pytest.mark.parametrize("protocol", ["mqttv311", "mqttv50"])
def test_commands_for_an_away_device_arrive_after_the_link_returns(
    mosquitto_factory: MosquittoFactory, tcp_proxy: TcpProxyFactory, pki: Pki, tmp_path: Path, protocol: str
) -> None:
    """The shipped bridge (MQTT 3.1.1) keeps its cloud session across an outage. The MQTT 5 variant is the
    rejected alternative: mosquitto 2.0's bridge sends no Session Expiry Interval, so the cloud drops the
    session and the commands sent meanwhile; this pins down why gateway.conf says mqttv311."""
    conf = SHIPPED_GATEWAY
    if protocol != "mqttv311":
        conf = tmp_path / "gateway-variant.conf"
        text = SHIPPED_GATEWAY.read_text(encoding="utf-8")
        assert "bridge_protocol_version mqttv311\n" in text
        conf.write_text(text.replace("bridge_protocol_version mqttv311\n", f"bridge_protocol_version {protocol}\n"))
    cloud_port, link, gateway = _stack(mosquitto_factory, tcp_proxy, pki, conf)
    cmd_topic = f"fleet/f1/{DEVICE}/cmd"
    device = Client(
        "127.0.0.1",
        gateway.port,
        DEVICE,
        pki.password(DEVICE),
        client_id=f"edge-{DEVICE}",
        clean_start=False,
        session_expiry_s=3600,
    )
    assert device.connect() == 0
    device.subscribe(cmd_topic)
    device.close()  # the device goes away; its session on the gateway keeps the subscription
    _cut(link)
    with Client("127.0.0.1", cloud_port, BRIDGE, pki.password(BRIDGE), pki.ca) as cloud:
        assert cloud.connect() == 0
        for n in range(3):
            cloud.publish(cmd_topic, f"cmd-{n}".encode())
    link.restore()
    # (Uses the bridge account too: one connection per account, as use_username_as_clientid enforces.)
    _wait_bridge_subscribed(cloud_port, gateway.port, pki, timeout=40)
    with Client("127.0.0.1", cloud_port, BRIDGE, pki.password(BRIDGE), pki.ca) as cloud:
        assert cloud.connect() == 0
        # Sent after the link is back: once it arrives, anything the sessions kept has arrived before it.
        cloud.publish(cmd_topic, b"marker")
    assert device.connect() == 0
    try:
        device.wait_for(lambda got: (cmd_topic, b"marker") in got, timeout=20)
    finally:
        device.close()
    payloads = [payload for _, payload in device.received()]
    expected = [b"cmd-0", b"cmd-1", b"cmd-2", b"marker"] if protocol == "mqttv311" else [b"marker"]
    assert payloads == expected


async def test_escalations_are_answered_through_the_gateway(
    mosquitto_factory: MosquittoFactory,
    tcp_proxy: TcpProxyFactory,
    pki: Pki,
    edge_model: DemoModel,
    tmp_path: Path,
) -> None:
    """The bridge link speaks MQTT 3.1.1, which drops the MQTT 5 Response Topic and Correlation Data the
    node sets: the answer must still come back, on the fixed reply topic, matched by request_id."""
    cloud_port, _, gateway = _stack(mosquitto_factory, tcp_proxy, pki)
    # The edge model stands in for the cloud model: what matters here is the round trip.
    escalation = EscalationConfig(model=str(edge_model.path))
    bridge_config = cloud_bridge_config(tmp_path, cloud_port, pki, escalation=escalation)
    node_config = edge_config(
        tmp_path,
        gateway.port,
        edge_model.path,
        mqtt={"username": DEVICE, "password": pki.password(DEVICE)},
        device={"device_id": DEVICE},
        # Nearly every input is escalated; a generous timeout so a slow answer is not a fallback.
        routing={"escalate": True, "confidence_threshold": 0.999, "escalation_timeout_s": 10.0},
        source={"kind": "replay", "rate_hz": 20.0},
    )
    async with running_bridge(bridge_config) as bridge, RunningNode(node_config):

        async def answered_by_cloud() -> int:
            rows = await bridge.registry.rows(ResultRow)
            return sum(1 for row in rows if row["path"] == "cloud")

        await wait_for_async(
            answered_by_cloud,
            40,
            "10 results answered by the cloud model through the gateway",
            until=lambda n: n >= 10,
            interval=_POLL_S,
        )
