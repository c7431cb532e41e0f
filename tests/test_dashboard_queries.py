"""Every query of the shipped Grafana dashboard, run against a real InfluxDB 1.6.7 the bridge wrote to.

No Grafana server installs here, so the test does Grafana's part: the template variables are
substituted as its InfluxDB datasource does (`interpolateQueryExpr`: "All" gives the custom all value
`.*` unescaped, a multi-value selection `(a|b)` with each value regex-escaped), then the backend's
macros (`$timeFilter` -> `time >= <from>ms and time <= <to>ms`, `$__interval`, `$__interval_ms`).

A real bridge (api = "v1") writes, through its real writer, real traffic: hand-made telemetry windows
of four devices in two fleets (one device then sends its last will), a digits stream that drifts
against the edge model's reference class mix (drift points, then an alert), escalations answered by a
real ONNX model (agreement points), one message of every uplink type, and a rollout point from the
rollout driver's formatter. Every panel query, both variables and the annotation must return what
those messages imply (devices online, rates, ratios, sums per graph step); a query that errors or
returns no series fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import numpy as np
import pytest

from bench.drift import DigitsStream, StreamSpec
from cloud_bridge.app import Bridge, running_bridge
from cloud_bridge.config import BridgeConfig, EscalationConfig, InfluxConfig, MqttConfig
from cloud_bridge.improve.driver import PHASE_CODES, loop_line
from cloud_bridge.improve.driver import STATE_CODES as LOOP_STATES
from cloud_bridge.rollout.driver import STATE_CODES, rollout_line
from demokit.dataset import DigitsSplit
from demokit.models import DEFAULT_VERSION, DemoModel, build_edge_model
from devservers import InfluxDB, Mosquitto
from edge_node.inference.model import Classifier
from schemas import (
    CommandAck,
    EscalationRequest,
    LatencyStats,
    LinkBytes,
    ModelRef,
    OutboxStats,
    Result,
    Results,
    Sample,
    Status,
    Telemetry,
    Topics,
    TopK,
    encode,
    encode_tensor,
    new_msg_id,
)
from schemas.codec import CHANNEL_TYPES, OLDER_TYPES
from schemas.messages import Envelope, EscalationCounts
from tests.factories import examples
from tests.poll import wait_for_async
from tests.test_grafana import DASHBOARD

pytestmark = pytest.mark.timeout(120)

_REGEX_SPECIAL = re.compile(r"[\\^$*+?.()|\[\]{}/]")
V1 = ModelRef(name="digits-edge", version="1.0.0", sha256="ab" * 32)
V2 = ModelRef(name="digits-edge", version="1.1.0", sha256="cd" * 32)
ROLLOUT = {"id": "r-1", "fleet_id": "f1", "model_name": "digits-edge", "model_version": "1.1.0"}
SHADOW = {"shadow_agreement": 0.9, "shadow_accuracy": 0.95, "active_accuracy": 0.6, "shadow_cloud_agreement": 0.4}
GATE = {"drifted_current": 0.45, "drifted_candidate": 0.9, "original_current": 0.956, "original_candidate": 0.967}
LOOP = {"id": "l-1", "fleet_id": "f1", "base_name": "digits-edge", "base_version": "1.0.0", "phase": "watch",
        "state": "running", "gate": {**GATE, "passed": True}}  # fmt: skip
# What devices send that the bridge ingests (escalations are answered, and counted, separately).
UPLINK = (Status, Telemetry, Sample, Results, Result, CommandAck)


# -- Grafana's part ----------------------------------------------------------------------------------


def escape_regex(value: str) -> str:
    """Grafana's escapeRegex (@grafana/data)."""
    return _REGEX_SPECIAL.sub(lambda m: "\\" + m.group(0), value)


def variable_value(definition: dict[str, Any], selected: list[str] | None) -> str:
    """What `$name` becomes in an InfluxQL query: None selects "All"."""
    if selected is None:
        return str(definition["allValue"])  # a custom all value is inserted as is
    if definition.get("multi"):
        return "(" + "|".join(escape_regex(v) for v in selected) + ")"
    (value,) = selected
    return value if re.match(r"^\s*[-+]?(\d|\.\d)", value) else escape_regex(value)


def interval_text(ms: int) -> str:
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


@dataclass(frozen=True)
class View:
    """A dashboard state: time range, graph step and the variables' selections (None = All)."""

    start_ms: int
    end_ms: int
    interval_ms: int = 10_000
    fleet: list[str] | None = None
    device: list[str] | None = None

    def render(self, query: str) -> str:
        variables = {v["name"]: v for v in board()["templating"]["list"]}
        for name in sorted(variables, key=len, reverse=True):
            value = variable_value(variables[name], getattr(self, name))
            query = query.replace("${" + name + "}", value)
            # The value is a replacement template here: its backslashes (regex escapes) must stay literal.
            query = re.sub(rf"\${name}\b", value.replace("\\", "\\\\"), query)
        text = interval_text(self.interval_ms)
        query = query.replace("$timeFilter", f"time >= {self.start_ms}ms and time <= {self.end_ms}ms")
        query = query.replace("$interval", text).replace("$__interval_ms", str(self.interval_ms))
        return query.replace("$__interval", text)

    def bucket(self, ts_ms: int, size_ms: int | None = None) -> int:
        size = size_ms or self.interval_ms
        return ts_ms - ts_ms % size

    def selects(self, fleet: str, device: str) -> bool:
        return (self.fleet is None or fleet in self.fleet) and (self.device is None or device in self.device)


def board() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def target(title_part: str, ref: str = "A") -> str:
    (panel,) = [p for p in board()["panels"] if title_part.lower() in p["title"].lower()]
    (found,) = [t for t in panel["targets"] if t["refId"] == ref]
    return str(found["query"])


def run(server: InfluxDB, db: str, view: View, query: str) -> list[dict[str, Any]]:
    """The series of one rendered query; an error raises, no series fails."""
    (result,) = server.query(view.render(query), db)
    series: list[dict[str, Any]] = result.get("series", [])
    assert series, f"no series for {view.render(query)}"
    return series


def by_tags(series: list[dict[str, Any]], *tags: str, column: int = 1) -> dict[tuple[Any, ...], Any]:
    """{(tag values..., time): value} of a GROUP BY query (nulls left out, as Grafana draws them)."""
    out = {}
    for s in series:
        for row in s["values"]:
            if row[column] is not None:
                out[(*(s.get("tags", {})[t] for t in tags), row[0])] = row[column]
    return out


def approx(values: dict[Any, float]) -> dict[Any, Any]:
    return {k: pytest.approx(v) for k, v in values.items()}


# -- the traffic -------------------------------------------------------------------------------------


def window(fleet: str, device: str, model: ModelRef, end: float, i: int) -> Telemetry:
    """A telemetry window whose numbers differ per device and window (so sums and ratios are checked)."""
    template = next(m for m in examples(fleet, device) if isinstance(m, Telemetry))
    seed = sum(map(ord, device)) + 7 * i
    count = 40 + seed % 60
    return msgspec.structs.replace(
        template,
        msg_id=new_msg_id(),
        ts=end,
        window_start=end - 10,
        window_end=end,
        window_seq=i,
        model=model,
        count=count,
        class_counts={"3": count // 3, "8": count - count // 3},
        latency_ms=LatencyStats(p50=1.0 + i, p95=2.0 + i + seed % 5, p99=9.0 + i, max=12.0 + i, mean=1.5),
        edge_latency_ms=None if device == "dev-c" else LatencyStats(p50=0.5, p95=0.7 + i, p99=0.9, max=1.0, mean=0.6),
        escalations=EscalationCounts(sent=seed % 11, answered=seed % 11, timed_out=0, agreed=seed % 7 % 11),
        outbox=OutboxStats(depth=seed % 13, bytes=100 * (seed % 13), evicted={"samples": i % 3} if i % 3 else {}),
        link=LinkBytes(
            up={"results": 100 * (seed % 7) + 50, "telemetry": 900 + i},
            down={"confirm": 150 + seed % 3, "results": 4 * (seed % 5)},
            held={"results": i % 4} if i % 4 else {},
            budget_left=1000 * seed if device != "dev-c" else None,
        ),
    )


@dataclass
class Traffic:
    telemetry: list[Telemetry]
    online: dict[tuple[str, str], bool]  # the last status each device's points say
    agreement: dict[tuple[str, str], tuple[int, int]]  # (device, version) -> (answered, agreed)


@pytest.fixture(scope="module")
def edge_model(tmp_path_factory: pytest.TempPathFactory) -> DemoModel:
    return build_edge_model(tmp_path_factory.mktemp("dashboard_model"), DEFAULT_VERSION)


@pytest.fixture(scope="module")
def written(
    tmp_path_factory: pytest.TempPathFactory, influxdb_session: InfluxDB, edge_model: DemoModel, digits: DigitsSplit
) -> Iterator[tuple[str, Traffic]]:
    """Runs the bridge once for the module (its own broker and database); yields (database, traffic)."""
    db = "dashboard"
    influxdb_session.create_database(db)
    root = tmp_path_factory.mktemp("dashboard")
    broker = Mosquitto(root / "mosquitto", name="mosquitto")
    broker.start()
    try:
        yield db, asyncio.run(_drive_bridge(root, broker, influxdb_session.url, db, edge_model, digits))
    finally:
        broker.stop()


async def _drive_bridge(
    root: Path, broker: Mosquitto, url: str, db: str, edge_model: DemoModel, digits: DigitsSplit
) -> Traffic:
    now = float(int(time.time()))
    stream = DigitsStream(
        Classifier.load(edge_model.path), np.asarray(digits.X_test), np.asarray(digits.y_test), "f1", "dev-drift"
    )
    # Drifted from the first window against the model's reference mix: drift points, then an alert.
    drifting = list(stream.telemetry(StreamSpec(windows=6, drift_at=0, seed=7), "class_shift:0.6", now - 600))
    hand = [window("f1", "dev-a", V1, now - 300 + 10 * i, i) for i in range(6)]
    hand += [window("f1", "dev-b", V2, now - 297 + 10 * i, i) for i in range(6)]
    hand += [window("f2", "dev-c", V1, now - 295 + 10 * i, i) for i in range(4)]
    birth = next(m for m in examples("f1", "dev-b") if isinstance(m, Status))
    will = msgspec.structs.replace(birth, msg_id=new_msg_id(), state="offline", reason="connection_lost")
    typed = [m for m in examples("f1", "dev-esc") if isinstance(m, UPLINK)]
    asks = escalations(20, digits)
    config = BridgeConfig(
        state_dir=str(root / "bridge"),
        mqtt=MqttConfig(host=broker.host, port=broker.port, client_id="bridge-dashboard"),
        influx=InfluxConfig(url=url, api="v1", database=db, flush_interval_s=0.05),
        escalation=EscalationConfig(model=str(edge_model.path)),
        drift=dataclasses.replace(BridgeConfig().drift, reference_models=(str(edge_model.path),)),
        status_interval_s=3600.0,  # the test flushes the agreement counts itself, once
    )
    uplink = [*typed, *drifting, *hand, birth, will]
    async with running_bridge(config) as bridge:
        await publish(broker, [*uplink, *asks])
        assert bridge.ingestor is not None and bridge.escalator is not None and bridge.tsdb is not None
        async with asyncio.timeout(30):
            await bridge.ingestor.wait_for(lambda s: s.stored + s.duplicates + s.dead_letters >= len(uplink))
        await wait_answered(bridge, len(asks))
        agreement = {(k[1], k[2]): (v[0], v[1]) for k, v in bridge.escalator.agreement.counts.items()}
        await bridge.flush_agreement()
        stages = {"stages": [10, 50, 100], "stage": 1, "state": "running"}
        bridge.tsdb.add([rollout_line({**ROLLOUT, **stages}, 3, {"canary_accuracy": 0.97}, now)])
        bridge.tsdb.add([loop_line(LOOP, now)])
        shadow = {"stages": [-100, 50, 100], "stage": 0, "state": "running", "id": "r-0", "model_version": "1.2.0"}
        bridge.tsdb.add([rollout_line({**ROLLOUT, **shadow}, 4, SHADOW, now)])
        assert await bridge.tsdb.flush(deadline_s=15)
        _assert_clean(bridge)
    telemetry = [m for m in uplink if isinstance(m, Telemetry)]
    online = {(m.fleet_id, m.device_id): True for m in telemetry}
    online[("f1", "dev-b")] = False  # its will came last
    return Traffic(telemetry, online, agreement)


def escalations(n: int, digits: DigitsSplit) -> list[EscalationRequest]:
    """Requests the bridge answers with its model (the edge model stands in for the cloud one here):
    digits whose "edge answer" is the true label for even i and a wrong one for odd i, so the
    agreement is neither 0 nor 1."""
    template = next(m for m in examples("f1", "dev-esc") if isinstance(m, EscalationRequest))
    deadline = time.time() + 60
    out = []
    for i in range(n):
        index = (int(digits.y_test[i]) + i % 2) % len(digits.labels)
        row = np.asarray(digits.X_test[i : i + 1], dtype=np.float32)
        out.append(
            msgspec.structs.replace(
                template,
                msg_id=new_msg_id(),
                request_id=f"req-{i}",
                deadline=deadline,
                input=encode_tensor(row),
                edge_topk=[TopK(label=digits.labels[index], index=index, prob=0.6)],
            )
        )
    return out


async def publish(broker: Mosquitto, messages: list[Envelope]) -> None:
    topics = Topics()
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        client.pending_calls_threshold = 10_000
        for m in messages:
            # The channel whose current type, or an older version it still accepts (result/1), this is.
            channel = next(c for c, t in CHANNEL_TYPES.items() if isinstance(m, (t, *OLDER_TYPES.get(c, ()))))
            await client.publish(topics.device(m.fleet_id, m.device_id, channel), encode(m), qos=1)


async def wait_answered(bridge: Bridge, n: int) -> None:
    assert bridge.escalator is not None
    agreement = bridge.escalator.agreement
    # The escalation worker has no progress event: its agreement counter is polled, bounded.
    await wait_for_async(
        lambda: sum(answered for answered, _ in agreement.counts.values()),
        30,
        f"{n} escalations answered",
        until=lambda answered: answered >= n,
        interval=0.05,
    )


def _assert_clean(bridge: Bridge) -> None:
    assert bridge.tsdb is not None
    assert bridge.tsdb.written > 0 and bridge.tsdb.rejected == 0 and bridge.tsdb.blocked is None


# -- the panels --------------------------------------------------------------------------------------


def _view(**selection: list[str]) -> View:
    end = int(time.time() * 1000) + 1000
    return View(end - 3_600_000, end, **selection)  # type: ignore[arg-type]


def _windows(traffic: Traffic, view: View) -> list[Telemetry]:
    return [m for m in traffic.telemetry if view.selects(m.fleet_id, m.device_id)]


def _ms(m: Telemetry) -> int:
    return round(m.window_end * 1000)


@pytest.mark.parametrize(
    "selection", [{}, {"fleet": ["f2"]}, {"fleet": ["f1"], "device": ["dev-a", "dev-b"]}], ids=["all", "f2", "a+b"]
)
def test_stat_panels(written: tuple[str, Traffic], influxdb_session: InfluxDB, selection: dict[str, list[str]]) -> None:
    db, traffic = written
    view = _view(**selection)
    mine = _windows(traffic, view)
    (online,) = run(influxdb_session, db, view, target("Devices online"))
    assert online["values"][0][1] == sum(up for (f, d), up in traffic.online.items() if view.selects(f, d))
    (rate,) = run(influxdb_session, db, view, target("Inferences/s (fleet)"))
    per_minute: dict[int, float] = defaultdict(float)
    for m in mine:
        per_minute[view.bucket(_ms(m), 60_000)] += m.count / 60
    assert dict(rate["values"]) == approx(per_minute)
    (evicted,) = run(influxdb_session, db, view, target("Outbox evictions"))
    assert evicted["values"][0][1] == sum(sum(m.outbox.evicted.values()) for m in mine)
    (esc,) = run(influxdb_session, db, view, target("Escalation rate (fleet)"))
    assert esc["values"][0][1] == pytest.approx(sum(m.escalations.sent for m in mine) / sum(m.count for m in mine))


@pytest.mark.parametrize("interval_ms", [10_000, 60_000])
def test_per_device_rates_and_latency(
    written: tuple[str, Traffic], influxdb_session: InfluxDB, interval_ms: int
) -> None:
    db, traffic = written
    view = dataclasses.replace(_view(), interval_ms=interval_ms)
    counts: dict[tuple[str, int], int] = defaultdict(int)
    sent: dict[tuple[str, int], int] = defaultdict(int)
    latency: dict[tuple[str, str, int], list[float]] = {}
    for m in traffic.telemetry:
        key = (m.device_id, view.bucket(_ms(m)))
        counts[key] += m.count
        sent[key] += m.escalations.sent
        if m.latency_ms is not None:
            lat = latency.setdefault((m.device_id, m.model.version, key[1]), [0.0] * 3)
            lat[:] = [max(lat[0], m.latency_ms.p50), max(lat[1], m.latency_ms.p95), max(lat[2], m.latency_ms.p99)]
    rates = by_tags(run(influxdb_session, db, view, target("Inferences/s per device")), "device")
    assert rates == approx({k: n * 1000 / interval_ms for k, n in counts.items()})
    esc = by_tags(run(influxdb_session, db, view, target("Escalation rate per device")), "device")
    assert esc == approx({k: sent[k] / n if n else 0.0 for k, n in counts.items()})
    series = run(influxdb_session, db, view, target("Latency"))
    assert series[0]["columns"] == ["time", "p50", "p95", "p99", "edge p95"]
    got = {k: [by_tags(series, "device", "version", column=c).get(k) for c in (1, 2, 3)] for k in latency}
    assert got == {k: pytest.approx(v) for k, v in latency.items()}
    edge = by_tags(series, "device", "version", column=4)
    assert {d for d, _, _ in edge} == {m.device_id for m in traffic.telemetry if m.edge_latency_ms is not None}


@pytest.mark.parametrize("interval_ms", [10_000, 60_000])
def test_class_mix_and_outbox(written: tuple[str, Traffic], influxdb_session: InfluxDB, interval_ms: int) -> None:
    db, traffic = written
    view = dataclasses.replace(_view(), interval_ms=interval_ms)
    classes: dict[tuple[str, int], int] = defaultdict(int)
    depth: dict[tuple[str, int], tuple[int, int]] = {}
    evicted: dict[tuple[str, int], int] = defaultdict(int)
    for m in traffic.telemetry:
        bucket = view.bucket(_ms(m))
        for label, n in m.class_counts.items():
            classes[(label, bucket)] += n
        depth[(m.device_id, bucket)] = max(depth.get((m.device_id, bucket), (0, 0)), (_ms(m), m.outbox.depth))
        evicted[(m.device_id, bucket)] += sum(m.outbox.evicted.values())
    assert by_tags(run(influxdb_session, db, view, target("Class mix")), "class") == classes
    outbox = run(influxdb_session, db, view, target("Outbox depth"))
    assert by_tags(outbox, "device") == {k: d for k, (_, d) in depth.items()}
    assert by_tags(run(influxdb_session, db, view, target("Outbox depth", "B")), "device") == evicted


def test_link_bytes_and_budget(written: tuple[str, Traffic], influxdb_session: InfluxDB) -> None:
    db, traffic = written
    view = _view()
    by_channel: dict[tuple[str, int], int] = defaultdict(int)
    held: dict[tuple[str, int], int] = defaultdict(int)
    per_device: dict[tuple[str, int], int] = defaultdict(int)
    left: dict[tuple[str, int], tuple[int, int]] = {}
    for m in traffic.telemetry:
        if m.link is None:  # the escalation and drift traffic's windows come from older devices
            continue
        bucket = view.bucket(_ms(m))
        for channel in m.link.up.keys() | m.link.down.keys() | m.link.held.keys():
            by_channel[(channel, bucket)] += m.link.up.get(channel, 0) + m.link.down.get(channel, 0)
            held[(channel, bucket)] += m.link.held.get(channel, 0)
        per_device[(m.device_id, bucket)] += sum(m.link.up.values()) + sum(m.link.down.values())
        if m.link.budget_left is not None:
            left[(m.device_id, bucket)] = max(left.get((m.device_id, bucket), (0, 0)), (_ms(m), m.link.budget_left))
    assert by_tags(run(influxdb_session, db, view, target("Link bytes per channel")), "channel") == by_channel
    assert by_tags(run(influxdb_session, db, view, target("Link bytes per channel", "B")), "channel") == held
    assert by_tags(run(influxdb_session, db, view, target("budget left")), "device") == per_device
    budget = by_tags(run(influxdb_session, db, view, target("budget left", "B")), "device")
    assert budget == {k: v for k, (_, v) in left.items()} and "dev-c" not in {d for d, _ in budget}


def test_agreement_drift_and_rollouts(written: tuple[str, Traffic], influxdb_session: InfluxDB) -> None:
    db, traffic = written
    view = _view()
    agreement = by_tags(run(influxdb_session, db, view, target("agreement")), "device", "version")
    ((answered, agreed),) = traffic.agreement.values()
    assert answered == 20 and 0 < agreed < answered
    assert {(d, v): a for (d, v, _), a in agreement.items()} == approx(
        {k: agreed / answered for k, (answered, agreed) in traffic.agreement.items()}
    )
    (raw,) = influxdb_session.query('SELECT "score", "threshold" FROM "drift" GROUP BY "device", "metric"', db)
    expected: dict[tuple[str, str, int], float] = {}
    for s in raw["series"]:
        for ts, score, _ in s["values"]:
            key = (s["tags"]["device"], s["tags"]["metric"], view.bucket(ts))
            expected[key] = max(expected.get(key, score), score)
    drift = run(influxdb_session, db, view, target("Drift"))
    assert by_tags(drift, "device", "metric") == approx(expected)
    assert {d for d, _, _ in expected} == {"dev-drift"}
    states = {s["tags"]["rollout"]: s for s in run(influxdb_session, db, view, target("Rollout stages"))}
    assert states["r-1"]["tags"] == {"rollout": "r-1", "version": "1.1.0", "stage": "50"}
    assert [v for _, v in states["r-1"]["values"]] == [STATE_CODES["running"]]
    assert states["r-0"]["tags"]["stage"] == "shadow100"
    devices = {s["tags"]["rollout"]: s for s in run(influxdb_session, db, view, target("Rollout stages", "B"))}
    assert devices["r-1"]["tags"] == {"rollout": "r-1", "stage": "50"}
    assert [v for _, v in devices["r-1"]["values"]] == [3]
    (shadow,) = run(influxdb_session, db, view, target("Shadow stage"))
    assert shadow["tags"] == {"rollout": "r-0", "version": "1.2.0"}
    names = ["agreement with active", "candidate accuracy", "active accuracy", "candidate-cloud agreement"]
    assert shadow["columns"][1:] == names
    assert [row[1:] for row in shadow["values"]] == [list(SHADOW.values())]
    (phase,) = run(influxdb_session, db, view, target("Improvement loops"))
    assert phase["tags"] == {"loop": "l-1", "base": "1.0.0"}
    assert [v for _, v in phase["values"]] == [PHASE_CODES["watch"]]
    (state,) = run(influxdb_session, db, view, target("Improvement loops", "B"))
    assert [v for _, v in state["values"]] == [LOOP_STATES["running"]]
    (gate,) = run(influxdb_session, db, view, target("Improvement gate"))
    assert gate["tags"] == {"loop": "l-1"} and gate["columns"][1:] == [k.replace("_", " ") for k in GATE]
    assert [row[1:] for row in gate["values"]] == [list(GATE.values())]


def test_variables_and_the_alert_annotation(written: tuple[str, Traffic], influxdb_session: InfluxDB) -> None:
    db, traffic = written
    variables = {v["name"]: v for v in board()["templating"]["list"]}

    def options(name: str, view: View) -> set[str]:
        return {value for s in run(influxdb_session, db, view, variables[name]["query"]) for _, value in s["values"]}

    devices = {(f, d) for f, d in traffic.online} | {("f1", "dev-esc")}
    assert options("fleet", _view()) == {"f1", "f2"}
    assert options("device", _view()) == {d for _, d in devices}
    assert options("device", _view(fleet=["f2"])) == {"dev-c"}
    assert options("device", _view(fleet=["f1", "f2"])) == {d for _, d in devices}
    annotation = board()["annotations"]["list"][0]["target"]
    (alerts,) = run(influxdb_session, db, _view(), annotation["query"])
    columns = alerts["columns"]
    needed = [annotation["textColumn"], *annotation["tagsColumn"].split(",")]
    assert set(needed) <= set(columns), f"annotation columns {needed} not in {columns}"
    rows = [dict(zip(columns, row, strict=True)) for row in alerts["values"]]
    assert (
        rows and {r["device"] for r in rows} == {"dev-drift"} and {r["state"] for r in rows} <= {"firing", "resolved"}
    )
    assert all(r["detail"] and r["kind"] for r in rows)
    with pytest.raises(AssertionError, match="no series"):  # the filter applies: f2 raised no alert
        run(influxdb_session, db, _view(fleet=["f2"]), annotation["query"])
