"""End-to-end delivery: a device deletes only what the cloud has stored, across broker restarts.

A real node, a real bridge and a real Mosquitto with persistence. The broker is SIGKILLed and
restarted twice while the bridge's link is held down by a proxy for several seconds, so the device
reconnects first and flushes into a broker that has forgotten the bridge's shared subscription
(Mosquitto 2.0.11, docs/traps.md #8): whatever it publishes then is routed to nobody. With
confirmed delivery the device keeps those rows until a bridge confirms them and sends them again;
the registry (where the user looks) must hold every inference and telemetry window exactly once.
The same run with delivery = "broker" is the control: it must lose messages, else the scenario no
longer reaches the trap and proves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from cloud_bridge.app import Bridge, running_bridge
from cloud_bridge.config import BridgeConfig, IngestConfig, MqttConfig, RegistryConfig
from cloud_bridge.registry import ResultRow, TelemetryRow
from demokit.models import DemoModel
from devservers import Mosquitto, TcpProxy
from edge_node.app import EdgeNode
from tests.broker_stack import start_cloud, start_gateway
from tests.edge_harness import RunningNode, edge_config
from tests.pki import BRIDGE, REPO, Pki
from tests.plugin_servers import MosquittoFactory, TcpProxyFactory

INPUTS = 2400
DEVICE = "dev-1"
RATE_HZ = 80.0


def _bridge_config(tmp_path: Path, port: int, name: str = "bridge-1") -> BridgeConfig:
    return BridgeConfig(
        state_dir=tmp_path / name,
        mqtt=MqttConfig(port=port, client_id=name, keepalive=5),
        registry=RegistryConfig(url=f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"),
        ingest=IngestConfig(confirm_interval_s=0.5),
    )


async def _poll(predicate: object, within_s: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + within_s
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out after {within_s}s waiting for {what}"
        await asyncio.sleep(0.2)


async def _outage(broker: Mosquitto, bridge_links: list[TcpProxy], hold_s: float) -> None:
    """Kill the broker, bring it back, and keep the bridges away while the device reconnects first."""
    for link in bridge_links:
        link.refuse()
    broker.kill()
    await asyncio.sleep(0.5)
    broker.start()
    await asyncio.sleep(hold_s)
    for link in bridge_links:
        link.restore()


async def _run(
    tmp_path: Path,
    broker: Mosquitto,
    tcp_proxy: TcpProxyFactory,
    model: DemoModel,
    delivery: str,
    bridges: int = 1,
    publish_results: bool = True,
) -> tuple[list[Bridge], EdgeNode, list[dict[str, object]], list[dict[str, object]]]:
    links = [tcp_proxy(broker.host, broker.port) for _ in range(bridges)]
    node_config = edge_config(
        tmp_path,
        broker.port,
        model.path,
        mqtt={"keepalive": 5},
        routing={"escalate": False, "publish_results": publish_results},
        telemetry={"interval_s": 1.0},
        outbox={"delivery": delivery, "confirm_timeout_s": 2.0, "confirm_timeout_max_s": 4.0},
        source={"kind": "replay", "rate_hz": RATE_HZ, "limit": INPUTS, "loop": False},
    )
    async with contextlib.AsyncExitStack() as stack:
        running = [
            await stack.enter_async_context(running_bridge(_bridge_config(tmp_path, link.port, f"bridge-{i + 1}")))
            for i, link in enumerate(links)
        ]
        registry = running[0].registry
        async with RunningNode(node_config) as node:

            async def stored(n: int) -> bool:
                if publish_results:
                    return await registry.count(ResultRow) >= n
                return node.processed >= n and await registry.count(TelemetryRow) >= n // RATE_HZ

            await _poll(lambda: stored(200), 30, "200 results in the registry")
            await _outage(broker, links, hold_s=6.0)
            await _poll(lambda: stored(1000), 60, "1000 results after the first outage")
            await _outage(broker, links, hold_s=6.0)

            async def replayed() -> bool:
                return node.processed >= INPUTS

            async def settled() -> bool:
                # confirmed: the outbox is empty once the cloud confirmed everything;
                # broker: empty once the broker acknowledged everything.
                return node.outbox is not None and node.outbox.depth == 0

            await _poll(replayed, 60, f"{INPUTS} inputs replayed")
            await _poll(settled, 60, "an empty outbox")
        await asyncio.sleep(1.5)  # the node's last window and shutdown status, sent on stop
        results = await registry.rows(ResultRow)
        windows = await registry.rows(TelemetryRow)
    return running, node, results, windows


@pytest.mark.parametrize("bridges", [1, 2])
async def test_the_registry_holds_everything_when_the_device_reconnects_before_the_bridge(
    mosquitto: Mosquitto, tcp_proxy: TcpProxyFactory, demo_models: dict[str, DemoModel], tmp_path: Path, bridges: int
) -> None:
    """One bridge, and two on $share with one registry."""
    running, node, results, windows = await _run(
        tmp_path, mosquitto, tcp_proxy, demo_models["edge"], "confirmed", bridges
    )
    ids = Counter(str(row["inference_id"]) for row in results)
    assert len(ids) == INPUTS and max(ids.values()) == 1, (
        f"{len(ids)} distinct of {INPUTS}, repeats {ids.most_common(3)}"
    )
    seqs = sorted(int(i.rsplit("-", 1)[1]) for i in ids)
    assert seqs == list(range(1, INPUTS + 1)), "a gap in the node's results"
    # Telemetry: every window once (a window is its msg_id: the registry's key makes a copy impossible,
    # so count windows by their sequence in the body), and together they count every inference.
    seqs_w = Counter(int(row["body"]["window_seq"]) for row in windows)  # type: ignore[index]
    assert max(seqs_w.values()) == 1 and sorted(seqs_w) == list(range(len(seqs_w)))
    assert sum(int(row["count"]) for row in windows) == INPUTS
    assert node.outbox is not None
    delivery = node.outbox.delivery
    # The scenario reached the trap: rows the broker acknowledged were never stored, and went again.
    assert delivery.resent > 0, "nothing was sent again: the broker kept the shared subscription?"
    confirmed = sum(b.confirmer.stats.seqs for b in running if b.confirmer is not None)
    assert confirmed >= delivery.confirmed > 0
    # The node asked a bridge for the time on each connect: same machine, so no offset to speak of.
    assert node.clock is not None and node.clock.offset_s is not None and abs(node.clock.offset_s) < 0.5
    assert sum(b.clock.stats.answered for b in running if b.clock is not None) >= 1


async def test_results_summarised_the_windows_count_every_inference_once(
    mosquitto: Mosquitto, tcp_proxy: TcpProxyFactory, demo_models: dict[str, DemoModel], tmp_path: Path
) -> None:
    """[routing] publish_results = false (the cheapest mode on a billed link): no result rows, and
    the telemetry windows, through the same outages, count every inference exactly once."""
    _, node, results, windows = await _run(
        tmp_path, mosquitto, tcp_proxy, demo_models["edge"], "confirmed", publish_results=False
    )
    assert results == []
    seqs_w = Counter(int(row["body"]["window_seq"]) for row in windows)  # type: ignore[index]
    assert max(seqs_w.values()) == 1 and sorted(seqs_w) == list(range(len(seqs_w)))
    assert sum(int(row["count"]) for row in windows) == INPUTS
    assert node.outbox is not None and node.outbox.delivery.resent > 0, "the outages reached nothing"


async def test_control_with_broker_delivery_the_same_outages_lose_messages(
    mosquitto: Mosquitto, tcp_proxy: TcpProxyFactory, demo_models: dict[str, DemoModel], tmp_path: Path
) -> None:
    _, _, results, _ = await _run(tmp_path, mosquitto, tcp_proxy, demo_models["edge"], "broker")
    distinct = {str(row["inference_id"]) for row in results}
    if len(distinct) == INPUTS:
        pytest.fail(
            "delivery = broker lost nothing: the broker now keeps shared subscriptions across restarts "
            "(docs/traps.md #8 no longer holds), so the confirmed test above no longer proves its point"
        )
    assert len(distinct) < INPUTS


async def test_a_gateway_whose_queue_overflowed_during_a_cut_loses_nothing(
    mosquitto_factory: MosquittoFactory,
    tcp_proxy: TcpProxyFactory,
    pki: Pki,
    demo_models: dict[str, DemoModel],
    tmp_path: Path,
) -> None:
    """The gateway acknowledges the device's messages, queues them for the cloud while its uplink is
    dead, and drops past its queue bound: the device must not have deleted what the gateway dropped."""
    small = tmp_path / "gateway.conf"
    small.write_text(
        re.sub(
            r"(?m)^max_queued_messages .*$", "max_queued_messages 30", (REPO / "mosquitto" / "gateway.conf").read_text()
        )
    )
    cloud = start_cloud(mosquitto_factory, pki)
    uplink = tcp_proxy("127.0.0.1", cloud.gateway_port)
    gateway = start_gateway(mosquitto_factory, pki, f"127.0.0.1:{uplink.port}", source=small, expect_drops=True)
    bridge_config = BridgeConfig(
        state_dir=tmp_path / "bridge",
        mqtt=MqttConfig(
            port=cloud.tls_port, client_id=BRIDGE, username=BRIDGE, password=pki.password(BRIDGE), tls_ca=pki.ca
        ),
        registry=RegistryConfig(url=f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"),
        ingest=IngestConfig(confirm_interval_s=0.5),
    )
    inputs = 600
    node_config = edge_config(
        tmp_path,
        gateway.port,
        demo_models["edge"].path,
        mqtt={"username": DEVICE, "password": pki.password(DEVICE), "protocol": "mqtt311"},
        device={"device_id": DEVICE},
        routing={"escalate": False},
        telemetry={"interval_s": 1.0},
        outbox={"confirm_timeout_s": 2.0, "confirm_timeout_max_s": 4.0},
        source={"kind": "replay", "rate_hz": 60.0, "limit": inputs, "loop": False},
    )
    async with running_bridge(bridge_config) as bridge, RunningNode(node_config) as node:

        async def stored(n: int) -> bool:
            return await bridge.registry.count(ResultRow) >= n

        await _poll(lambda: stored(50), 40, "50 results through the gateway")
        uplink.blackhole()  # a dead radio link: the gateway queues, then drops past 30 messages
        await _poll(lambda: _dropped(gateway), 30, "the gateway to drop queued messages")
        uplink.restore()

        async def settled() -> bool:
            return node.processed >= inputs and node.outbox is not None and node.outbox.depth == 0

        await _poll(settled, 90, "every message confirmed")
        ids = {str(row["inference_id"]) for row in await bridge.registry.rows(ResultRow)}
        assert node.outbox is not None and node.outbox.delivery.resent > 0
    assert len(ids) == inputs


async def _dropped(gateway: Mosquitto) -> bool:
    return gateway.dropped_messages_logged()
