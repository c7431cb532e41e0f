"""The link's byte counts and budgets: the daily byte budget over a simulated day (an injectable
clock), the node's MQTT-level counts against a TCP counting proxy, and a running node holding
results back when its budget is short while telemetry still flows and counts them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from demokit.models import DemoModel
from devservers import Mosquitto, TcpProxy
from devservers.mqttwire import WireCounter
from edge_node.routing.budget import RateBudget
from edge_node.uplink.budget import DAY_S, ByteBudget, Spend, channel_of, publish_size
from schemas import Input, Telemetry, encode, encode_tensor
from tests.edge_harness import RunningNode, edge_config, wait_connected
from tests.mqtt_collector import Collector
from tests.poll import wait_for_async

pytestmark = pytest.mark.timeout(120)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# What a 20 Hz device wants to send in one second, in bytes per message (compact encoding): results
# coalesced into one message a second, an escalation every 5 s, a sample every 10 s, telemetry every
# 10 s. 63 MB a day in all.
DEMAND = {  # every so many seconds, a message of so many bytes
    Spend.RESULTS: (1, 500),
    Spend.ESCALATIONS: (5, 640),
    Spend.SAMPLES: (10, 330),
    Spend.TELEMETRY: (10, 700),
}
CHANNEL = {
    Spend.RESULTS: "results",
    Spend.ESCALATIONS: "escalate",
    Spend.SAMPLES: "samples",
    Spend.TELEMETRY: "telemetry",
}


def simulate_day(daily_bytes: int) -> tuple[ByteBudget, dict[Spend, int]]:
    """A day of DEMAND against a budget, one step a second; returns the budget and what was sent."""
    clock = FakeClock()
    budget = ByteBudget(daily_bytes, clock=clock)
    sent = dict.fromkeys(DEMAND, 0)
    for second in range(int(DAY_S)):
        clock.now = float(second)
        for spend, (period, size) in DEMAND.items():
            if second % period:
                continue
            if budget.allows(spend):
                budget.sent(CHANNEL[spend], size)
                sent[spend] += 1
            else:
                budget.hold(CHANNEL[spend])
    return budget, sent


def test_a_day_within_the_budget_spends_it_by_priority() -> None:
    daily = 20_000_000
    budget, sent = simulate_day(daily)
    spent = sum(budget.up.values())
    assert 0.95 * daily <= spent <= 1.05 * daily, f"spent {spent} of {daily}"
    # Telemetry and escalations fit (6 + 11 MB): none held; samples and results share the rest,
    # samples first.
    assert budget.held["telemetry"] == 0 and budget.held["escalate"] == 0
    assert sent[Spend.TELEMETRY] == 8640 and sent[Spend.ESCALATIONS] == 17280
    samples_share = sent[Spend.SAMPLES] / 8640
    results_share = sent[Spend.RESULTS] / 86400
    assert samples_share > results_share and 0 < results_share < 1
    assert budget.held["results"] == 86400 - sent[Spend.RESULTS]


def test_a_budget_below_telemetry_alone_grows_the_windows_and_stays_within_it() -> None:
    daily = 3_000_000  # telemetry alone would cost 6 MB
    budget, sent = simulate_day(daily)
    spent = sum(budget.up.values())
    assert 0.95 * daily <= spent <= 1.05 * daily, f"spent {spent} of {daily}"
    # Only the bucket the node starts with went to anything but telemetry.
    others = sum(sent[s] * DEMAND[s][1] for s in (Spend.RESULTS, Spend.SAMPLES, Spend.ESCALATIONS))
    assert others <= budget.capacity
    assert 0 < sent[Spend.TELEMETRY] < 8640 and budget.held["telemetry"] == 8640 - sent[Spend.TELEMETRY]


def test_demand_under_the_budget_sends_everything() -> None:
    budget, sent = simulate_day(100_000_000)
    assert budget.held == {} and sent[Spend.RESULTS] == 86400
    assert budget.take().left is not None


def test_control_is_never_held_and_queued_bytes_count_as_spent() -> None:
    clock = FakeClock()
    queued = [0]
    budget = ByteBudget(86_400, clock=clock, pending=lambda: queued[0])  # 1 byte/s, 1800 B bucket
    budget.sent("status", 10_000)  # a reconnect storm overspends: control goes anyway
    assert budget.allows(Spend.CONTROL) and not budget.allows(Spend.TELEMETRY)
    clock.now += 10_000  # refilled to the bucket's size (1800 B), no more
    assert budget.allows(Spend.RESULTS)
    queued[0] = 1000  # 1000 B wait in the outbox: only telemetry and escalations may add to them
    assert not budget.allows(Spend.RESULTS) and not budget.allows(Spend.SAMPLES) and budget.allows(Spend.ESCALATIONS)
    counts = budget.take()
    assert counts.up == {"status": 10_000} and counts.left == 1800
    assert budget.take().up == {}  # counts are per window


def test_rate_budget_refills_per_minute() -> None:
    budget = RateBudget(6)
    assert [budget.admit(0.0) for _ in range(7)] == [True] * 6 + [False]
    assert budget.admit(10.0) and not budget.admit(10.0)  # one token per 10 s
    assert budget.take_counts() == (7, 2)
    assert not RateBudget(0).admit(0.0)


def test_channels_and_packet_sizes() -> None:
    assert channel_of("fleet/f1/dev-1/escalate/reply") == "escalate/reply"
    assert channel_of("fleet/f1/dev-1/clock/reply") == "clock/reply"
    assert channel_of("fleet/f1/dev-1/results") == "results"
    assert channel_of("fleet/f1/models/" + "a" * 64) == "models"
    # 2 + 5 topic + 2 packet id + 100 payload + 1 empty properties = 110: header 1 + length 1.
    assert publish_size(5, 100, 1, 1) == 112
    assert publish_size(5, 200, 0, None) == 1 + 2 + 2 + 5 + 200  # remaining 207 needs 2 bytes


def _inputs(n: int) -> list[bytes]:
    x = np.zeros(64, np.float32)
    return [
        encode(
            Input(
                msg_id=f"in-{i}",
                fleet_id="f1",
                device_id="dev-1",
                ts=time.time(),
                input_id=f"i{i}",
                tensor=encode_tensor(x),
            )
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("protocol", ["mqtt5", "mqtt311"])
async def test_the_node_counts_what_a_tcp_proxy_counts(
    tmp_path: Path, mosquitto: Mosquitto, demo_models: dict[str, DemoModel], protocol: str
) -> None:
    counter = WireCounter()
    with TcpProxy(mosquitto.host, mosquitto.port, tap=counter.feed) as proxy:
        config = edge_config(
            tmp_path,
            proxy.port,
            demo_models["edge"].path,
            mqtt={"protocol": protocol, "keepalive": 60},
            routing={"escalate": False},
            telemetry={"interval_s": 0.5},
        )
        async with RunningNode(config) as node:
            await wait_connected(node)
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
                for payload in _inputs(200):
                    await client.publish("fleet/f1/dev-1/input", payload, qos=1)
            assert node.link is not None
            await wait_for_async(lambda: node.processed, 20, "200 inputs answered", until=lambda n: n >= 200)
            await asyncio.sleep(1.2)  # a telemetry window and its PUBACK
            meter = node.link.meter
            up, down = sum(meter.up.values()), sum(meter.down.values())
            wire_up, wire_down = counter.total("up"), counter.total("down")
    # Within 2%: what the node cannot see is the keepalive (none in this run) and any packet in
    # flight at the moment of reading.
    assert wire_up * 0.98 <= up <= wire_up * 1.02, (up, wire_up)
    assert wire_down * 0.98 <= down <= wire_down * 1.02, (down, wire_down)
    assert meter.up["results"] > 0 and meter.up["telemetry"] > 0 and meter.down["input"] > 0


async def test_a_short_budget_holds_results_back_and_telemetry_counts_them(
    tmp_path: Path, mosquitto: Mosquitto, demo_models: dict[str, DemoModel]
) -> None:
    # 200 kB a day: a bucket of ~4 kB, of which results may spend a quarter.
    config = edge_config(
        tmp_path,
        mosquitto.port,
        demo_models["edge"].path,
        routing={"escalate": False},
        telemetry={"interval_s": 0.5},
        uplink={"daily_bytes": 200_000, "results_max_answers": 16},
    )
    with Collector(mosquitto.host, mosquitto.port, ["fleet/f1/dev-1/#"]) as sub:
        async with RunningNode(config) as node:
            await wait_connected(node)
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
                for payload in _inputs(300):
                    await client.publish("fleet/f1/dev-1/input", payload, qos=1)
            await wait_for_async(lambda: node.processed, 20, "300 inputs answered", until=lambda n: n >= 300)
            await asyncio.sleep(1.2)
        windows = [r.message() for r in sub.on("telemetry")]
        answers = sub.answers()
    telemetry = [w for w in windows if isinstance(w, Telemetry)]
    assert telemetry, "telemetry still flows under a short budget"
    held = sum(w.link.held.get("results", 0) for w in telemetry if w.link is not None)
    counted = sum(w.count for w in telemetry)
    assert held > 0 and len(answers) < 300
    # Every input is accounted for: uploaded as an answer, or held back and counted in telemetry.
    assert len({a.inference_id for a in answers}) + held == 300 == counted
    assert all(w.link is not None and w.link.budget_left is not None for w in telemetry)
