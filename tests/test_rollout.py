"""Canary rollouts: the verdict as pure functions, selection, the lease, and the driver inside real bridges.

The integration tests run real bridges (cloud_bridge.app) on a real Mosquitto with a real SQLite
registry. The devices are simulated peers (`SimFleet`): they ack commands like a device that installs
at once and publish telemetry whose statistics depend on the model they run, so each gate can be
driven precisely. tests/test_rollout_e2e.py runs the same flows with real edge nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import subprocess
import sys
import threading
import time
import typing
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud_bridge.app import running_bridge
from cloud_bridge.cli import main as cli_main
from cloud_bridge.config import BridgeConfig, InfluxConfig, MqttConfig, OtaConfig, RolloutConfig, load_config
from cloud_bridge.errors import ConfigError
from cloud_bridge.models.store import ModelRecord, ModelStore
from cloud_bridge.ota.keys import GeneratedKey, generate
from cloud_bridge.registry import Registry
from cloud_bridge.rollout.driver import rollout_line, thresholds_from
from cloud_bridge.rollout.policy import (
    GroupStats,
    Thresholds,
    aggregate,
    install_outcome,
    judge_install,
    judge_window,
    parse_thresholds,
    thresholds_for,
)
from cloud_bridge.rollout.stages import FleetDevice, select_stage, selection_key, stage_target
from cloud_bridge.rollout.store import NewRollout, RolloutStore
from devservers import Mosquitto, VictoriaMetrics
from schemas import (
    Command,
    CommandAck,
    ConfidenceStats,
    EscalationCounts,
    LatencyStats,
    ModelRef,
    Status,
    Telemetry,
    decode,
    encode,
    new_msg_id,
)
from schemas.codec import to_builtins
from schemas.topics import Channel, Topics
from tests.poll import wait_for_async
from tests.rollout_helpers import FLEET, POLL_S, Db, cli_config

pytestmark = pytest.mark.timeout(90)

OLD = ModelRef(name="digits-edge", version="1.0.0", sha256="ab" * 32)


# ---- the verdict, on synthetic window statistics ---------------------------------------------------
def group(**overrides: Any) -> GroupStats:
    base: dict[str, Any] = dict(
        devices=2,
        windows=10,
        inferences=1000,
        rejected=5,
        escalations=100,
        answered=100,
        agreed=95,
        confidence_mean=0.90,
        latency_p95_ms=2.0,
    )
    base.update(overrides)
    return GroupStats(**base)


T = Thresholds(min_inferences=200, min_answered=20)


def test_healthy_window_promotes_only_once_elapsed() -> None:
    assert judge_window(group(), group(), T, window_elapsed=False).verdict == "wait"
    decision = judge_window(group(), group(), T, window_elapsed=True)
    assert decision.verdict == "promote"
    assert all(c.passed for c in decision.checks)


@pytest.mark.parametrize("short", ["canary", "control"])
def test_too_few_inferences_never_promotes(short: str) -> None:
    small = group(inferences=50, escalations=5, answered=5, agreed=5)
    canary, control = (small, group()) if short == "canary" else (group(), small)
    assert judge_window(canary, control, T, window_elapsed=False).verdict == "wait"
    decision = judge_window(canary, control, T, window_elapsed=True)
    assert decision.verdict == "hold"
    assert f"{short} has 50 inferences < min_inferences 200" in decision.reason


@pytest.mark.parametrize(
    ("metric", "canary", "fragment"),
    [
        ("escalation_rate", group(escalations=250, answered=250, agreed=238), "canary 0.25 vs control 0.1"),
        ("agreement", group(agreed=60), "canary 0.6 vs control 0.95"),
        ("confidence_mean", group(confidence_mean=0.70), "canary 0.7 vs control 0.9"),
        ("rejection_rate", group(rejected=100), "canary 0.09091 vs control 0.004975"),
        ("latency_p95_ms", group(latency_p95_ms=12.0), "canary 12 vs control 2"),
    ],
)
def test_each_metric_rolls_back_naming_canary_and_control(metric: str, canary: GroupStats, fragment: str) -> None:
    # Before the window ends: a crossed threshold does not wait.
    decision = judge_window(canary, group(), T, window_elapsed=False)
    assert decision.verdict == "rollback"
    assert decision.reason.startswith(metric)
    assert fragment in decision.reason
    assert [c.metric for c in decision.checks if c.passed is False] == [metric]


def test_just_within_limits_passes() -> None:
    canary = group(escalations=199, answered=199, agreed=189, confidence_mean=0.86, latency_p95_ms=8.9)
    assert judge_window(canary, group(), T, window_elapsed=True).verdict == "promote"


def test_agreement_is_not_judged_without_enough_answers() -> None:
    canary = group(answered=10, agreed=1)
    decision = judge_window(canary, group(), T, window_elapsed=True)
    assert decision.verdict == "promote"
    agreement = next(c for c in decision.checks if c.metric == "agreement")
    assert agreement.passed is None and "needs 20 answered" in agreement.limit


def test_install_failures_roll_back_and_pending_waits() -> None:
    assert judge_install(install_outcome(["done", "sent", "downloading"]), T).verdict == "wait"
    assert judge_install(install_outcome(["done", "done"]), T).verdict == "promote"
    failed = judge_install(install_outcome(["done", "health_failed", "sent"]), T)
    assert failed.verdict == "rollback"
    assert "install_failures: 1/3 devices failed (health_failed=1)" in failed.reason
    tolerant = replace(T, max_install_failure_rate=0.5)
    assert judge_install(install_outcome(["done", "rejected", "done"]), tolerant).verdict == "promote"
    assert judge_install(install_outcome(["timeout", "rejected", "done"]), tolerant).verdict == "rollback"


def telemetry(device: str, model: ModelRef, count: int, **fields: Any) -> Telemetry:
    now = time.time()
    return Telemetry(
        msg_id=new_msg_id(), fleet_id=FLEET, device_id=device, ts=now, model=model, window_start=now - 1,
        window_end=now, window_seq=0, count=count, **fields,
    )  # fmt: skip


def test_aggregate_weights_by_count_and_reads_stored_bodies() -> None:
    bodies = [
        to_builtins(
            telemetry(
                "d1", OLD, 100, rejected=10,
                latency_ms=LatencyStats(p50=1, p95=2, p99=3, max=4, mean=1),
                confidence=ConfidenceStats(mean=0.9, p05=0.5, min=0.1),
                escalations=EscalationCounts(sent=10, answered=8, agreed=6),
            )
        ),
        to_builtins(
            telemetry(
                "d2", OLD, 300,
                latency_ms=LatencyStats(p50=1, p95=6, p99=7, max=8, mean=1),
                confidence=ConfidenceStats(mean=0.5, p05=0.2, min=0.1),
            )
        ),
        to_builtins(telemetry("d2", OLD, 0)),  # an idle window: no stats, zero defaults omitted on the wire
    ]  # fmt: skip
    stats = aggregate(bodies)
    assert (stats.devices, stats.windows, stats.inferences, stats.rejected) == (2, 3, 400, 10)
    assert (stats.escalations, stats.answered, stats.agreed) == (10, 8, 6)
    assert stats.confidence_mean == pytest.approx((0.9 * 100 + 0.5 * 300) / 400)
    assert stats.latency_p95_ms == pytest.approx((2 * 100 + 6 * 300) / 400)
    assert stats.escalation_rate == pytest.approx(10 / 400)
    assert stats.rejection_rate == pytest.approx(10 / 410)
    assert stats.agreement == pytest.approx(0.75)


def test_thresholds_per_rollout_and_per_stage() -> None:
    overrides = parse_thresholds(["max_agreement_drop=0.2,min_inferences=50", "100:max_agreement_drop=0.01"])
    assert overrides == {"*": {"max_agreement_drop": 0.2, "min_inferences": 50.0}, "100": {"max_agreement_drop": 0.01}}
    five = thresholds_for(Thresholds(), overrides, 5)
    assert (five.max_agreement_drop, five.min_inferences) == (0.2, 50)
    assert isinstance(five.min_inferences, int)
    assert thresholds_for(Thresholds(), overrides, 100).max_agreement_drop == 0.01
    for bad, message in (
        ("max_agreement=0.1", "unknown threshold"),
        ("max_agreement_drop", "name=value"),
        ("x:max_agreement_drop=1", "stage percentage"),
        ("max_agreement_drop=abc", "not a number"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_thresholds([bad])


# ---- selection ----------------------------------------------------------------------------------
def fleet_of(
    n: int, offline: frozenset[str] = frozenset(), on_target: frozenset[str] = frozenset()
) -> list[FleetDevice]:
    return [
        FleetDevice(f"d{i:02d}", f"d{i:02d}" not in offline, "m", "1", "new" if f"d{i:02d}" in on_target else "old")
        for i in range(n)
    ]


def test_selection_is_deterministic_cumulative_and_skips_offline() -> None:
    devices = fleet_of(20)
    order = [d.device_id for d in sorted(devices, key=lambda d: selection_key("r1", d.device_id))]
    stage1 = select_stage("r1", devices, set(), "new", 5)
    assert [d.device_id for d in stage1] == order[:1]
    stage2 = select_stage("r1", devices, {d.device_id for d in stage1}, "new", 25)
    assert [d.device_id for d in stage2] == order[1:5]
    # Another rollout id shuffles differently, so the same devices are not always the canaries.
    assert [d.device_id for d in select_stage("r2", devices, set(), "new", 25)] != order[:5]
    # An offline device is skipped; the next one in order takes its place.
    offline = fleet_of(20, offline=frozenset({order[0]}))
    assert [d.device_id for d in select_stage("r1", offline, set(), "new", 10)] == order[1:3]
    # 100 % takes every eligible device; devices already on the new model are not part of the fleet count.
    done = {d.device_id for d in stage1 + stage2}
    rest = select_stage("r1", fleet_of(20, on_target=frozenset({"d19"})), done, "new", 100)
    assert {d.device_id for d in rest} == {d.device_id for d in devices} - done - {"d19"}


def test_stage_target_is_a_ceiling_in_integers() -> None:
    assert [stage_target(p, 3) for p in (5, 25, 34, 67, 100)] == [1, 1, 2, 3, 3]
    assert stage_target(100, 7) == 7 and stage_target(1, 0) == 0


def test_rollout_line_escapes_and_codes_state() -> None:
    rollout = {
        "fleet_id": "f 1", "id": "r1", "model_name": "digits-edge", "model_version": "2.0.0", "stages": [5, 100],
        "stage": 1, "state": "rolled_back",
    }  # fmt: skip
    text = rollout_line(rollout, 3, {"canary_agreement": 0.5}, 1_700_000_000.0)
    assert text == (
        r"rollout,fleet=f\ 1,model=digits-edge,rollout=r1,stage=100,version=2.0.0 "
        "devices=3i,state=4i,canary_agreement=0.5 1700000000000"
    )


# ---- a real registry: the lease -------------------------------------------------------------------
def tiny_model(path: Path, version: str) -> Path:
    """A real (if untrained) ONNX classifier with the metadata the model store reads."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((64, 10), float(version.split(".")[0]), dtype=np.float32), "W")
    bias = numpy_helper.from_array(np.zeros(10, dtype=np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "W", "B"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    labels = [str(i) for i in range(10)]
    helper.set_model_props(
        model,
        {"labels": json.dumps(labels), "model_name": "digits-edge", "model_version": version,
         "reference_class_mix": json.dumps({label: 0.1 for label in labels})},
    )  # fmt: skip
    onnx.save(model, str(path))
    return path


async def exercise_store(url: str, tmp_path: Path) -> None:
    registry = Registry(url)
    await registry.create()
    try:
        record = await ModelStore(tmp_path / "models", registry).add(tiny_model(tmp_path / "m.onnx", "2.0.0"))
        store = RolloutStore(registry)
        rid = await store.create(NewRollout(FLEET, record, (50, 100), 10.0, {"*": {"min_inferences": 5.0}}), now=1000.0)
        assert await store.claim(rid, "a", now=1000.0, lease_s=5)
        assert not await store.claim(rid, "b", now=1004.0, lease_s=5)
        assert await store.update(rid, "a", reason="a drives")
        assert not await store.update(rid, "b", reason="b must not")
        assert await store.claim(rid, "b", now=1006.0, lease_s=5)  # a's lease ran out
        assert not await store.update(rid, "a", reason="a lost it")
        row = await store.get(rid)
        assert row is not None and (row["owner"], row["reason"]) == ("b", "a drives")
        assert row["thresholds"] == {"*": {"min_inferences": 5.0}} and row["stages"] == [50, 100]
        await store.release("b")
        assert await store.claim(rid, "c", now=1006.5, lease_s=5)  # released: taken at once
        await store.add_devices(rid, FLEET, 0, [FleetDevice("d1", True, "digits-edge", "1.0.0", OLD.sha256)])
        await store.update_device(rid, "d1", cmd_id=new_msg_id(), state="sent")
        (device,) = await store.devices(rid)
        assert (device["state"], device["previous_sha256"]) == ("sent", OLD.sha256)
        with pytest.raises(ValueError, match="still running"):
            await store.create(NewRollout(FLEET, record, (100,), 10.0, {}))
        assert [r["id"] for r in await store.active()] == [rid]
        assert await store.abort(rid, "stop", rollback=True)
        assert not await store.abort(rid, "again", rollback=False)
        assert not await store.update(rid, "c", reason="aborted rows are not driven")
        assert [r["id"] for r in await store.active()] == [rid]  # rollback commands still to send
        assert await store.update(rid, "c", expect_state=None, rollback_pending=False)
        assert await store.active() == []
    finally:
        await registry.close()


async def test_store_and_lease_on_sqlite(tmp_path: Path) -> None:
    await exercise_store(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}", tmp_path)


async def test_store_and_lease_on_postgresql(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    await exercise_store(request.getfixturevalue("postgres_url"), tmp_path)


# ---- simulated devices against real bridges -------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """What a model's telemetry looks like per window of `count` inferences."""

    escalation_rate: float = 0.10
    agreement: float = 0.95
    confidence: float = 0.90
    latency_p95_ms: float = 2.0


@dataclass
class SimFleet:
    """Test peers standing in for devices: ack commands at once, publish telemetry shaped by `profiles`."""

    host: str
    port: int
    devices: list[str]
    profiles: dict[str, Profile]
    fail_updates: set[int] = field(default_factory=set)  # ordinals (1-based) of updates to fail health checks
    models: dict[str, ModelRef] = field(default_factory=dict)
    commands: dict[str, list[Command]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.topics = Topics()
        self.models = {d: OLD for d in self.devices}
        self.commands = {d: [] for d in self.devices}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sim-fleet", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self._subscribed.set()

    def __enter__(self) -> SimFleet:
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        self.client.subscribe(f"fleet/{FLEET}/+/cmd", qos=1)
        assert self._subscribed.wait(10)
        for device in self.devices:
            status = Status(
                msg_id=new_msg_id(), fleet_id=FLEET, device_id=device, ts=time.time(), state="online",
                reason="connected", model=OLD,
            )  # fmt: skip
            self.client.publish(self.topics.device(FLEET, device, Channel.STATUS), encode(status), qos=1, retain=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _ack(self, command: Command, state: str, model: ModelRef | None) -> None:
        ack = CommandAck(
            msg_id=new_msg_id(), fleet_id=FLEET, device_id=command.device_id, ts=time.time(), cmd_id=command.cmd_id,
            state=state, model=model, rollout_id=command.rollout_id,  # type: ignore[arg-type]
        )  # fmt: skip
        self.client.publish(self.topics.device(FLEET, command.device_id, Channel.CMD_ACK), encode(ack), qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        command = decode(msg.payload, Command)
        with self.lock:
            self.commands[command.device_id].append(command)
            ordinal = sum(c.action == "model_update" for cs in self.commands.values() for c in cs)
        self._ack(command, "received", None)
        if command.action == "model_update" and command.update is not None:
            if ordinal in self.fail_updates:
                self._ack(command, "health_failed", command.update.model)
                return
            with self.lock:
                self.models[command.device_id] = command.update.model
            self._ack(command, "installed", command.update.model)
            self._ack(command, "done", command.update.model)
        elif command.action == "rollback":
            with self.lock:
                self.models[command.device_id] = OLD
            self._ack(command, "done", OLD)

    def publish_window(self, count: int = 100) -> None:
        with self.lock:
            models = dict(self.models)
        for device, model in models.items():
            p = self.profiles[model.version]
            sent = round(count * p.escalation_rate)
            window = telemetry(
                device, model, count,
                latency_ms=LatencyStats(p50=1.0, p95=p.latency_p95_ms, p99=p.latency_p95_ms, max=9.0, mean=1.0),
                confidence=ConfidenceStats(mean=p.confidence, p05=0.3, min=0.1),
                escalations=EscalationCounts(sent=sent, answered=sent, agreed=round(sent * p.agreement)),
            )  # fmt: skip
            self.client.publish(self.topics.device(FLEET, device, Channel.TELEMETRY), encode(window), qos=1)

    def updates(self, device: str) -> list[Command]:
        with self.lock:
            return [c for c in self.commands[device] if c.action == "model_update"]

    def rollbacks(self, device: str) -> list[Command]:
        with self.lock:
            return [c for c in self.commands[device] if c.action == "rollback"]

    async def wait_back_on(self, model: ModelRef, devices: list[str]) -> None:
        """Until each of `devices` runs `model` again (their rollback commands are acked at once)."""
        await wait_for_async(
            lambda: {d: self.models[d] for d in devices},
            10,
            f"{devices} back on {model.version}",
            until=lambda models: all(m == model for m in models.values()),
            interval=POLL_S,
        )


@contextlib.asynccontextmanager
async def telemetry_flowing(fleet: SimFleet, every_s: float = 0.2) -> AsyncIterator[None]:
    async def loop() -> None:
        while True:
            fleet.publish_window()
            await asyncio.sleep(every_s)  # the devices' reporting interval, not a wait for a result

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def signing_key(tmp_path: Path) -> GeneratedKey:
    keys = tmp_path / "keys"
    keys.mkdir()
    return generate(keys)


def bridge_config(
    tmp_path: Path,
    broker: Mosquitto,
    key: GeneratedKey,
    client_id: str = "bridge-a",
    victoria: VictoriaMetrics | None = None,
    **rollout: Any,
) -> BridgeConfig:
    settings: dict[str, Any] = dict(tick_s=0.2, lease_s=2.0, window_s=1.5, min_inferences=100, min_answered=10)
    settings.update(rollout)
    return BridgeConfig(
        state_dir=str(tmp_path / "state"),
        status_interval_s=60.0,
        mqtt=MqttConfig(host=broker.host, port=broker.port, client_id=client_id),
        ota=OtaConfig(signing_key=str(key.private_path)),
        rollout=RolloutConfig(**settings),
        influx=InfluxConfig(url=victoria.url, flush_interval_s=0.05) if victoria else InfluxConfig(),
    )


async def register(db: Db, tmp_path: Path, version: str = "2.0.0") -> ModelRecord:
    return await db.models.add(tiny_model(tmp_path / f"model-{version}.onnx", version))


DEVICES = ["d1", "d2", "d3", "d4"]
GOOD = {"1.0.0": Profile(), "2.0.0": Profile()}
# 100 inferences per window: 10 escalations, 9 agreed (0.9) on the old model, 12 and 6 (0.5) on the bad one.
CONTROL = Profile(escalation_rate=0.10, agreement=0.9)
DEGRADED = Profile(escalation_rate=0.12, agreement=0.5)


async def test_healthy_rollout_promotes_to_100_percent_across_a_bridge_restart(
    tmp_path: Path, mosquitto: Mosquitto, signing_key: GeneratedKey
) -> None:
    config = bridge_config(tmp_path, mosquitto, signing_key)
    with SimFleet(mosquitto.host, mosquitto.port, DEVICES, GOOD) as fleet:
        async with Db(config) as db, telemetry_flowing(fleet):
            record = await register(db, tmp_path)
            async with running_bridge(config):
                await db.wait_devices(4)
                rid = await db.store.create(NewRollout(FLEET, record, (25, 50, 100), 1.5, {}))
                await db.wait_rollout(rid, lambda r: r["phase"] == "watching")
            # The bridge stopped mid-stage: everything it knew is in the registry, its lease handed back.
            stopped = await db.store.get(rid)
            assert stopped is not None
            assert (stopped["state"], stopped["stage"], stopped["phase"], stopped["owner"]) == (
                "running",
                0,
                "watching",
                None,
            )
            first = await db.store.devices(rid)
            order = sorted(DEVICES, key=lambda d: selection_key(rid, d))
            assert [(d["device_id"], d["state"], d["stage"]) for d in first] == [(order[0], "done", 0)]
            # The same bridge restarts and carries on from stage 0's watch.
            async with running_bridge(config):
                final = await db.wait_rollout(rid, lambda r: r["state"] != "running", limit_s=40)
        assert final["state"] == "promoted", final["reason"]
        assert final["phase"] == "finished" and "window passed" in final["reason"]
        rows = {d["device_id"]: d for d in await db.store.devices(rid)}
        assert {d: rows[d]["stage"] for d in DEVICES} == {order[0]: 0, order[1]: 1, order[2]: 2, order[3]: 2}
        assert all(r["state"] == "done" and r["previous_version"] == "1.0.0" for r in rows.values())
        # Exactly one update per device, none resent after the restart, and no rollback.
        for device in DEVICES:
            updates = fleet.updates(device)
            assert len(updates) == 1 and updates[0].update is not None
            assert updates[0].update.model == record.ref and updates[0].rollout_id == rid
            assert fleet.rollbacks(device) == []
            assert fleet.models[device] == record.ref


async def test_degraded_canary_is_rolled_back_with_the_reason_and_tsdb_events(
    tmp_path: Path,
    mosquitto: Mosquitto,
    signing_key: GeneratedKey,
    victoria_session: VictoriaMetrics,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = bridge_config(tmp_path, mosquitto, signing_key, victoria=victoria_session)
    profiles = {"1.0.0": CONTROL, "2.0.0": DEGRADED}
    with SimFleet(mosquitto.host, mosquitto.port, DEVICES, profiles) as fleet:
        async with Db(config) as db, telemetry_flowing(fleet):
            record = await register(db, tmp_path)
            async with running_bridge(config) as bridge:
                await db.wait_devices(4)
                rid = await db.store.create(NewRollout(FLEET, record, (50, 100), 30.0, {}))
                final = await db.wait_rollout(rid, lambda r: r["state"] != "running" and not r["rollback_pending"])
                canaries = [d["device_id"] for d in await db.store.devices(rid)]
                await fleet.wait_back_on(OLD, canaries)
                assert bridge.tsdb is not None and await bridge.tsdb.flush(deadline_s=10)
    # Rolled back early (window 30 s) on agreement, with both values recorded.
    assert final["state"] == "rolled_back" and final["stage"] == 0
    assert final["reason"].startswith("agreement: canary 0.5 vs control 0.9 "), final["reason"]
    assert final["last_eval"]["verdict"] == "rollback"
    assert len(canaries) == 2
    for device in DEVICES:
        assert len(fleet.rollbacks(device)) == (1 if device in canaries else 0)
        assert len(fleet.updates(device)) == (1 if device in canaries else 0)
    # The rollout's events reached the TSDB: the last one says rolled_back (state code 4).
    exported = await asyncio.to_thread(victoria_session.export, f'{{__name__="rollout_state",rollout="{rid}"}}')
    assert exported and exported[0].labels["fleet"] == FLEET and exported[0].labels["version"] == "2.0.0"
    assert exported[0].values[-1] == 4.0
    # The operator view says the same.
    toml = cli_config(tmp_path, config)
    assert await asyncio.to_thread(cli_main, ["rollout", "status", rid, "--config", str(toml)]) == 0
    out = capsys.readouterr().out
    assert "rolled_back" in out and "agreement" in out and "FAIL" in out


async def test_install_failure_rolls_back_the_devices_that_installed(
    tmp_path: Path, mosquitto: Mosquitto, signing_key: GeneratedKey
) -> None:
    config = bridge_config(tmp_path, mosquitto, signing_key)
    # The second update command of the first stage fails its health check on the device.
    with SimFleet(mosquitto.host, mosquitto.port, DEVICES, GOOD, fail_updates={2}) as fleet:
        async with Db(config) as db, telemetry_flowing(fleet):
            record = await register(db, tmp_path)
            async with running_bridge(config):
                await db.wait_devices(4)
                rid = await db.store.create(NewRollout(FLEET, record, (50, 100), 30.0, {}))
                final = await db.wait_rollout(rid, lambda r: r["state"] != "running")
                rows = {d["device_id"]: d for d in await db.store.devices(rid)}
                failed = [d for d, row in rows.items() if row["state"] == "health_failed"]
                installed = [d for d, row in rows.items() if row["state"] == "done"]
                assert len(failed) == 1 and len(installed) == 1, rows
                await wait_for_async(
                    lambda: fleet.rollbacks(installed[0]), 10, f"a rollback command to {installed[0]}", interval=POLL_S
                )
    assert final["state"] == "rolled_back"
    assert "install_failures: 1/2 devices failed (health_failed=1)" in final["reason"]
    assert rows[failed[0]]["rollback_cmd_id"] is None and fleet.rollbacks(failed[0]) == []
    assert fleet.models[installed[0]] == OLD


async def test_two_bridges_drive_a_rollout_exactly_once(
    tmp_path: Path, mosquitto: Mosquitto, signing_key: GeneratedKey
) -> None:
    config_a = bridge_config(tmp_path, mosquitto, signing_key, client_id="bridge-a")
    config_b = bridge_config(tmp_path, mosquitto, signing_key, client_id="bridge-b")
    with SimFleet(mosquitto.host, mosquitto.port, DEVICES, GOOD) as fleet:
        async with Db(config_a) as db, telemetry_flowing(fleet):
            record = await register(db, tmp_path)
            async with running_bridge(config_a) as a, running_bridge(config_b) as b:
                await db.wait_devices(4)
                rid = await db.store.create(NewRollout(FLEET, record, (50, 100), 1.0, {}))
                seen: set[str] = set()

                def finished(row: dict[str, Any]) -> bool:
                    if row["owner"] is not None:
                        seen.add(row["owner"])
                    return bool(row["state"] != "running")

                final = await db.wait_rollout(rid, finished, limit_s=40)
                assert a.rollouts is not None and b.rollouts is not None
                # Both bridges ticked all along, but only one ever held the rollout.
                assert a.rollouts.ticks > 5 and b.rollouts.ticks > 5
                assert len(seen) == 1 and seen <= {a.rollouts.owner, b.rollouts.owner}, seen
    assert final["state"] == "promoted", final["reason"]
    for device in DEVICES:
        assert len(fleet.updates(device)) == 1, device


async def test_cli_start_status_abort(
    tmp_path: Path, mosquitto: Mosquitto, signing_key: GeneratedKey, capsys: pytest.CaptureFixture[str]
) -> None:
    config = bridge_config(tmp_path, mosquitto, signing_key)
    toml = cli_config(tmp_path, config)
    async with Db(config) as db:
        await register(db, tmp_path)

    def cli(*args: str) -> tuple[int, str, str]:
        code = cli_main(["rollout", *args, "--config", str(toml)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    # No device has reported yet: the fleet must be named.
    code, _, err = await asyncio.to_thread(cli, "start", "--model", "digits-edge", "--version", "2.0.0")
    assert code == 2 and "pass --fleet" in err
    for bad, message, expected in (
        (["--stages", "50,25"], "increasing percentages", 2),  # usage errors exit 2
        (["--thresholds", "max_agreement=1"], "unknown threshold", 2),
        (["--thresholds", "30:max_agreement_drop=0.1"], "not in --stages", 2),
        (["--version", "9.9.9"], "not registered", 1),  # a lookup that failed exits 1
    ):
        args = ["start", "--model", "digits-edge", "--version", "2.0.0", "--fleet", FLEET, *bad]
        code, _, err = await asyncio.to_thread(cli, *args)
        assert code == expected and err.startswith("cloud-bridge rollout start: ") and message in err, (bad, err)
    code, out, _ = await asyncio.to_thread(
        cli, "start", "--model", "digits-edge", "--version", "2.0.0", "--fleet", FLEET, "--stages", "10,100",
        "--thresholds", "100:max_agreement_drop=0.02", "--window-s", "60",
    )  # fmt: skip
    assert code == 0
    rid = out.strip()
    code, out, _ = await asyncio.to_thread(cli, "status")
    assert code == 0 and rid in out and "running" in out and "10,100" in out
    code, out, _ = await asyncio.to_thread(cli, "status", rid, "--json")
    shown = json.loads(out)
    assert shown["thresholds"] == {"100": {"max_agreement_drop": 0.02}} and shown["window_s"] == 60
    code, out, _ = await asyncio.to_thread(cli, "abort", rid, "--rollback")
    assert code == 0 and "aborted" in out
    code, _, err = await asyncio.to_thread(cli, "abort", rid)
    assert code == 1 and err == f"cloud-bridge rollout abort: rollout {rid} is aborted, not running: nothing to abort\n"
    async with Db(config) as db:
        row = await db.store.get(rid)
    assert row is not None and (row["state"], row["rollback_pending"], row["reason"]) == (
        "aborted",
        True,
        "aborted by operator",
    )


async def test_abort_with_rollback_is_carried_out_by_the_running_bridge(
    tmp_path: Path, mosquitto: Mosquitto, signing_key: GeneratedKey
) -> None:
    config = bridge_config(tmp_path, mosquitto, signing_key)
    toml = cli_config(tmp_path, config)
    with SimFleet(mosquitto.host, mosquitto.port, DEVICES, GOOD) as fleet:
        async with Db(config) as db, telemetry_flowing(fleet):
            record = await register(db, tmp_path)
            async with running_bridge(config):
                await db.wait_devices(4)
                rid = await db.store.create(NewRollout(FLEET, record, (50, 100), 60.0, {}))
                await db.wait_rollout(rid, lambda r: r["phase"] == "watching")
                args = ["rollout", "abort", rid, "--rollback", "--reason", "ops: freeze", "--config", str(toml)]
                assert await asyncio.to_thread(cli_main, args) == 0
                final = await db.wait_rollout(rid, lambda r: not r["rollback_pending"])
                took = [d["device_id"] for d in await db.store.devices(rid)]
                await fleet.wait_back_on(OLD, took)
    assert (final["state"], final["reason"]) == ("aborted", "ops: freeze")
    assert len(took) == 2
    for device in DEVICES:
        assert len(fleet.rollbacks(device)) == (1 if device in took else 0)


def test_rollout_config_section_and_env_overrides(tmp_path: Path) -> None:
    path = tmp_path / "cloud.toml"
    path.write_text("[rollout]\nwindow_s = 120\nmax_agreement_drop = 0.02\n", encoding="utf-8")
    config = load_config(path, env={"CLOUD_BRIDGE__ROLLOUT__MIN_INFERENCES": "500"})
    assert (config.rollout.window_s, config.rollout.max_agreement_drop) == (120.0, 0.02)
    thresholds = thresholds_from(config.rollout)
    assert (thresholds.min_inferences, thresholds.max_agreement_drop) == (500, 0.02)
    with pytest.raises(ConfigError, match=r"\[rollout\] lease_s = 5.0 must exceed 2 x tick_s"):
        load_config(None, env={"CLOUD_BRIDGE__ROLLOUT__LEASE_S": "5", "CLOUD_BRIDGE__ROLLOUT__TICK_S": "5"})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \[rollout\] window: known keys"):
        load_config(None, env={"CLOUD_BRIDGE__ROLLOUT__WINDOW": "5"})


def test_thresholds_are_defined_once_by_the_policy() -> None:
    """Thresholds names the thresholds, their types and defaults; the `[rollout]` section must carry
    exactly those (until RolloutConfig derives from Thresholds this catches a copy that drifted)."""
    policy = {f.name: (typing.get_type_hints(Thresholds)[f.name], f.default) for f in dataclasses.fields(Thresholds)}
    hints = typing.get_type_hints(RolloutConfig)
    section = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(RolloutConfig) if f.name in policy}
    assert section == policy
    assert thresholds_from(RolloutConfig()) == Thresholds()
    # The config builds on the policy, so the policy must not import the config (or anything that does).
    probe = "import sys, cloud_bridge.rollout.policy; print('cloud_bridge.config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
