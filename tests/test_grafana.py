"""The Grafana dashboard queries only measurements, fields and tags the cloud bridge really writes.

A real bridge writes to victoria-metrics (the InfluxDB v2 write API stand-in, which stores each field as
a series `<measurement>_<field>` labelled with the tags) from real traffic: one message of every type
(tests/factories.py), digits telemetry drifting against the edge model's reference class mix (drift and
alert points), and escalations answered by a real ONNX model (agreement points). Rollout points come
from the rollout driver's own formatter through the bridge's writer: a full rollout needs signed model
delivery to live devices, which tests/test_rollout.py covers. Every name parsed from the dashboard's
Flux queries must be among the exported series and labels.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import numpy as np
import pytest
import yaml

from bench.drift import DigitsStream, StreamSpec
from cloud_bridge.app import Bridge, running_bridge
from cloud_bridge.config import BridgeConfig, EscalationConfig, InfluxConfig, MqttConfig
from cloud_bridge.rollout.driver import rollout_line
from demokit.dataset import DigitsSplit
from demokit.models import DEFAULT_VERSION, DemoModel, build_edge_model
from devservers import Mosquitto, VictoriaMetrics
from edge_node.inference.model import Classifier
from schemas import (
    CommandAck,
    EscalationRequest,
    Result,
    Results,
    Sample,
    Status,
    Telemetry,
    Topics,
    encode,
    new_msg_id,
)
from schemas.codec import CHANNEL_TYPES, OLDER_TYPES
from schemas.messages import Envelope
from tests.factories import examples

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "grafana" / "dashboards" / "fleet.json"
PROVISIONING = REPO / "grafana" / "provisioning"
TOPICS = Topics()
# Columns Flux itself provides, not tags.
_BUILTIN = {"_time", "_value", "_field", "_measurement", "_start", "_stop"}
# What devices send that the bridge ingests (escalations are answered, and counted, separately).
_UPLINK = (Status, Telemetry, Sample, Results, Result, CommandAck)


@dataclass
class Query:
    where: str
    text: str
    measurements: set[str] = field(default_factory=set)
    fields: set[str] = field(default_factory=set)
    tags: set[str] = field(default_factory=set)


def parse(where: str, text: str) -> Query:
    """Names a Flux query uses: `r._measurement == "m"`, `r._field == "f"` / `contains(... set: [...])`,
    `group(columns: [...])`, `r.tag` / `r["tag"]` and `schema.tagValues(tag: "t")`."""
    q = Query(where, text)
    q.measurements = set(re.findall(r'r\._measurement\s*==\s*"([^"]+)"', text))
    q.fields = set(re.findall(r'r\._field\s*==\s*"([^"]+)"', text))
    for group in re.findall(r"contains\(value:\s*r\._field,\s*set:\s*\[([^\]]*)\]", text):
        q.fields |= set(re.findall(r'"([^"]+)"', group))
    columns = re.findall(r"(?:group|pivot)\([^)]*columns:\s*\[([^\]]*)\]", text)
    names = {n for c in columns for n in re.findall(r'"([^"]+)"', c)}
    names |= set(re.findall(r"\br\.([A-Za-z_][A-Za-z0-9_]*)", text))
    names |= set(re.findall(r'\br\["([^"]+)"\]', text))
    names |= set(re.findall(r'tag:\s*"([^"]+)"', text))
    # After a pivot, fields are columns too (r.count): those are not tags.
    q.tags = names - _BUILTIN - q.fields
    return q


def dashboard_queries() -> list[Query]:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    out = [parse(f"panel {p['title']!r} {t['refId']}", t["query"]) for p in board["panels"] for t in p["targets"]]
    out += [parse(f"annotation {a['name']!r}", a["target"]["query"]) for a in board["annotations"]["list"]]
    out += [parse(f"variable {v['name']!r}", v["query"]) for v in board["templating"]["list"]]
    return out


def test_dashboard_is_wired_to_the_provisioned_datasource() -> None:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    (source,) = yaml.safe_load((PROVISIONING / "datasources" / "influxdb.yaml").read_text())["datasources"]
    assert source["jsonData"]["version"] == "Flux"
    used = {p["datasource"]["uid"] for p in board["panels"]} | {
        t["datasource"]["uid"] for p in board["panels"] for t in p["targets"]
    }
    assert used == {source["uid"]}
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "edgefleet.yaml").read_text())["providers"]
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2][::-1] for v in compose["services"]["grafana"]["volumes"])
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in ("online", "inferences/s", "p95", "escalation rate", "agreement", "class mix", "drift", "outbox"):
        assert topic in titles, f"no panel about {topic}"
    assert "rollout" in titles


def test_every_query_names_one_measurement_and_its_fields() -> None:
    for q in dashboard_queries():
        if q.where.startswith("variable"):
            assert not q.measurements and q.tags, q.where
            continue
        assert len(q.measurements) == 1 and q.fields, f"{q.where}: expected one measurement and its fields"


@pytest.fixture(scope="module")
def edge_model(tmp_path_factory: pytest.TempPathFactory) -> DemoModel:
    return build_edge_model(tmp_path_factory.mktemp("grafana_model"), DEFAULT_VERSION)


def _escalations(n: int) -> list[EscalationRequest]:
    """Requests the bridge answers with its model (the edge model stands in for the cloud one here)."""
    template = next(m for m in examples("f1", "dev-esc") if isinstance(m, EscalationRequest))
    deadline = time.time() + 60
    return [
        msgspec.structs.replace(template, msg_id=new_msg_id(), request_id=f"req-{i}", deadline=deadline)
        for i in range(n)
    ]


async def _publish(broker: Mosquitto, messages: list[Envelope]) -> None:
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        client.pending_calls_threshold = 10_000
        for m in messages:
            topic = _topic_of(m)
            await client.publish(topic, encode(m), qos=1)


def _topic_of(message: Envelope) -> str:
    # The channel whose current type, or an older version it still accepts (result/1), this is.
    channel = next(c for c, t in CHANNEL_TYPES.items() if isinstance(message, (t, *OLDER_TYPES.get(c, ()))))
    return TOPICS.device(message.fleet_id, message.device_id, channel)


def _rollout_point(now: float) -> str:
    rollout: dict[str, Any] = {
        "id": "r-1",
        "fleet_id": "f1",
        "model_name": "digits-edge",
        "model_version": "1.1.0",
        "stages": [10, 50, 100],
        "stage": 1,
        "state": "running",
    }
    return rollout_line(rollout, 3, {"canary_accuracy": 0.97, "control_accuracy": 0.95}, now)


async def test_dashboard_queries_match_what_the_bridge_writes(
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria: VictoriaMetrics,
    edge_model: DemoModel,
    digits: DigitsSplit,
) -> None:
    stream = DigitsStream(
        Classifier.load(edge_model.path), np.asarray(digits.X_test), np.asarray(digits.y_test), "f1", "dev-drift"
    )
    # Drifted from the first window against the model's reference mix: drift points, then an alert.
    drifting = list(stream.telemetry(StreamSpec(windows=6, drift_at=0, seed=7), "class_shift:0.6", time.time() - 600))
    typed = [m for m in examples("f1", "dev-1") if isinstance(m, _UPLINK)]
    escalations = _escalations(20)
    config = BridgeConfig(
        state_dir=str(tmp_path / "bridge"),
        mqtt=MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id="bridge-grafana"),
        influx=InfluxConfig(url=victoria.url, flush_interval_s=0.05),
        escalation=EscalationConfig(model=str(edge_model.path)),
        drift=dataclasses.replace(BridgeConfig().drift, reference_models=(str(edge_model.path),)),
        # No periodic agreement flush while the test counts answers; it flushes them itself.
        status_interval_s=3600.0,
    )
    ingested = len(drifting) + len(typed)
    async with running_bridge(config) as bridge:
        await _publish(mosquitto, [*typed, *drifting, *escalations])
        assert bridge.ingestor is not None and bridge.escalator is not None
        async with asyncio.timeout(30):
            await bridge.ingestor.wait_for(lambda s: s.stored + s.duplicates + s.dead_letters >= ingested)
        await _wait_answered(bridge, len(escalations))
        await bridge.flush_agreement()
        assert bridge.tsdb is not None
        bridge.tsdb.add([_rollout_point(time.time())])
        assert await bridge.tsdb.flush(deadline_s=15)
    series = await asyncio.to_thread(victoria.export)
    labels: dict[str, set[str]] = {}
    for s in series:
        labels.setdefault(s.name, set()).update(s.labels)
    problems = []
    for q in dashboard_queries():
        for measurement in q.measurements:
            for f in q.fields:
                if f"{measurement}_{f}" not in labels:
                    problems.append(f"{q.where}: field {measurement}.{f} is never written")
            written = set().union(*(v for k, v in labels.items() if k.startswith(f"{measurement}_")))
            problems += [f"{q.where}: tag {t} is not a tag of {measurement}" for t in q.tags - written]
        if not q.measurements:  # template variables: the tag exists on some measurement
            every = set().union(*labels.values())
            problems += [f"{q.where}: tag {t} is written nowhere" for t in q.tags - every]
    assert not problems, "\n".join(problems) + f"\nwritten series: {sorted(labels)}"


async def _wait_answered(bridge: Bridge, n: int) -> None:
    assert bridge.escalator is not None
    agreement = bridge.escalator.agreement
    deadline = time.monotonic() + 30
    # The escalation worker has no progress event: its agreement counter is polled, bounded.
    while sum(answered for answered, _ in agreement.counts.values()) < n:
        assert time.monotonic() < deadline, "escalations were not answered in 30 s"
        await asyncio.sleep(0.05)
