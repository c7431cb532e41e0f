"""OTA install on the edge: A/B slots, health check, atomic switch under load, probation, rollback.

Real parts only: real ONNX models (demo edge variants, and broken ones derived from them with the
onnx package), a real Mosquitto, a real edge node (in-process, or as a process killed with SIGKILL
for the crash loop), real slot files and outbox. Commands reach the node signed over MQTT where the
path matters (edge_node/ota/agent.py hands the verified file to the SlotManager, installer.py); the finer cases
call the node's SlotManager directly, as that glue does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from common.files import file_sha256
from demokit.models import DemoModel, build_edge_model, load_split
from devservers import Mosquitto
from edge_node.config import EdgeConfig, load_config
from edge_node.errors import ConfigError
from edge_node.inference.model import Classifier
from edge_node.ota.boot import boot_slots
from edge_node.ota.health import HealthPolicy, check_health
from edge_node.ota.installer import SlotManager
from edge_node.ota.slots import STATE_FILE, SlotState, SlotStore
from schemas import (
    Channel,
    Command,
    CommandAck,
    Input,
    ModelRef,
    ModelUpdate,
    Results,
    Status,
    Telemetry,
    Topics,
    decode,
    encode,
    encode_tensor,
    new_msg_id,
)
from schemas.signing import Ed25519PrivateKey, generate_private_key, key_id_of, public_key_b64, sign_command
from tests.config_files import write_edge_config
from tests.edge_harness import RunningNode, edge_config, wait_connected
from tests.mqtt_collector import Answered, Collector
from tests.processes import run_edge_node, stop

FLEET, DEVICE = "f1", "dev-1"
TOPICS = Topics()
CMD_TOPIC = TOPICS.device(FLEET, DEVICE, Channel.CMD)
INPUT_TOPIC = TOPICS.device(FLEET, DEVICE, Channel.INPUT)


# ---- models ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Models:
    base: DemoModel  # the factory model, 1.0.0
    better: DemoModel  # 1.1.0, 32 hidden units
    bad: DemoModel  # trained on shuffled labels: healthy by its own reference, far less confident
    corrupt: Path
    wrong_shape: Path
    wrong_labels: Path
    off_reference: Path
    slow: Path
    fragile: Path  # raises in run when input[0] is outside 0..16 (never in its reference inputs)
    nan_out: Path  # outputs NaN
    no_reference: Path  # `better` without health_reference metadata


def _props(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _save(model: onnx.ModelProto, path: Path, **props: str) -> Path:
    merged = {**_props(model), **props}
    helper.set_model_props(model, merged)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _add_to_logits(model: onnx.ModelProto, nodes: list[onnx.NodeProto], extra: str) -> onnx.ModelProto:
    """Rewire the graph so the output is logits + `extra` (a tensor broadcastable to [N, 10])."""
    graph = model.graph
    out = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{o}_raw" if o == out else o for o in node.output]
    graph.node.extend([*nodes, helper.make_node("Add", [f"{out}_raw", extra], [out])])
    return model


def _derived(better: Path, out: Path) -> dict[str, Path]:
    data = better.read_bytes()
    corrupt = out / "corrupt.onnx"
    corrupt.write_bytes(data[: len(data) // 2])

    wrong_shape = onnx.load(str(better))
    g = wrong_shape.graph
    w0 = next(i for i in g.initializer if i.name == "W0")
    w0.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w0)[:32].copy(), "W0"))
    g.input[0].CopyFrom(helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 32]))
    props = _props(wrong_shape)
    del props["health_reference"]

    wrong_labels = onnx.load(str(better))
    off = onnx.load(str(better))
    w = next(i for i in off.graph.initializer if i.name == "W1")
    noisy = numpy_helper.to_array(w) + np.random.default_rng(0).normal(0, 0.5, size=tuple(w.dims)).astype(np.float32)
    w.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), "W1"))

    # ~268M multiply-adds per call that depend on the input (so nothing folds them away) and add
    # 1e-12 of their mean to the logits: same outputs, much slower. (~67M came in under the 1.0 ms
    # budget on a fast host: a fresh-clone run installed the "slow" model.)
    slow = _add_to_logits(
        onnx.load(str(better)),
        [
            helper.make_node("ReduceMean", ["input"], ["m"], keepdims=0),
            helper.make_node("Expand", ["m", "big_shape"], ["big"]),
            helper.make_node("MatMul", ["big", "big_w"], ["prod"]),
            helper.make_node("ReduceMean", ["prod"], ["prod_mean"], keepdims=0),
            helper.make_node("Mul", ["prod_mean", "tiny"], ["slow_extra"]),
        ],
        "slow_extra",
    )
    slow.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([4096, 64], np.int64), "big_shape"),
            numpy_helper.from_array(np.random.default_rng(1).random((64, 1024), np.float32), "big_w"),
            numpy_helper.from_array(np.array(1e-12, np.float32), "tiny"),
        ]
    )
    # Gather(table[17], input[:, 0]) checks its indices: a first pixel outside 0..16 makes ORT raise.
    fragile = _add_to_logits(
        onnx.load(str(better)),
        [
            helper.make_node("Slice", ["input", "zero", "one", "one"], ["first"]),
            helper.make_node("Cast", ["first"], ["first_i"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "first_i"], ["picked"]),
        ],
        "picked",
    )
    fragile.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(np.zeros(17, np.float32), "table"),
        ]
    )
    nan_out = _add_to_logits(
        onnx.load(str(better)),
        [
            helper.make_node("ReduceMean", ["input"], ["nan_m"], keepdims=0),
            helper.make_node("Neg", ["nan_m"], ["nan_neg"]),
            helper.make_node("Sub", ["nan_neg", "nan_one"], ["nan_below"]),
            helper.make_node("Sqrt", ["nan_below"], ["nan_extra"]),  # sqrt of a negative number
        ],
        "nan_extra",
    )
    nan_out.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "nan_one"))
    no_reference = onnx.load(str(better))
    unreferenced = _props(no_reference)
    del unreferenced["health_reference"]
    helper.set_model_props(no_reference, unreferenced)
    return {
        "nan_out": _save(nan_out, out / "nan_out.onnx"),
        "no_reference": _save(no_reference, out / "no_reference.onnx"),
        "corrupt": corrupt,
        "wrong_shape": _save(wrong_shape, out / "wrong_shape.onnx", **props),
        "wrong_labels": _save(wrong_labels, out / "wrong_labels.onnx", labels=json.dumps(list("abcdefghij"))),
        "off_reference": _save(off, out / "off_reference.onnx"),
        "slow": _save(slow, out / "slow.onnx"),
        "fragile": _save(fragile, out / "fragile.onnx"),
    }


@pytest.fixture(scope="module")
def models() -> Models:
    # Trained models are cached across runs in the repo's build dir (build_model rebuilds a file whose
    # recorded training configuration differs); the broken variants are derived afresh every time.
    out = Path(__file__).resolve().parents[1] / "build" / "test-models" / "ota_install"
    out.mkdir(parents=True, exist_ok=True)
    base = build_edge_model(out, "1.0.0")
    better = build_edge_model(out, "1.1.0", hidden=(32,))
    bad = build_edge_model(out, "0.9.0-bad", shuffle_labels=True)
    return Models(base=base, better=better, bad=bad, **_derived(better.path, out))


def ref_of(path: Path, name: str = "digits-edge", version: str = "1.1.0") -> ModelRef:
    return ModelRef(name=name, version=version, sha256=file_sha256(path))


def demo_ref(model: DemoModel) -> ModelRef:
    return ModelRef(name=model.name, version=model.version, sha256=model.sha256)


# ---- commands, config, observation -----------------------------------------------------------------
def update_command(ref: ModelRef, size: int, **update: Any) -> Command:
    now = time.time()
    return Command(
        msg_id=new_msg_id(),
        fleet_id=FLEET,
        device_id=DEVICE,
        ts=now,
        cmd_id=new_msg_id(),
        action="model_update",
        issued_at=now,
        expires_at=now + 3600,
        key_id="unsigned-direct-call",
        update=ModelUpdate(
            model=ref,
            size=size,
            chunk_size=65536,
            chunks=max(1, -(-size // 65536)),
            chunk_topic=TOPICS.model_chunks(FLEET, ref.sha256),
            **update,
        ),
        rollout_id="r-test",
        stage=0,
    )


def rollback_command() -> Command:
    now = time.time()
    return Command(
        msg_id=new_msg_id(),
        fleet_id=FLEET,
        device_id=DEVICE,
        ts=now,
        cmd_id=new_msg_id(),
        action="rollback",
        issued_at=now,
        expires_at=now + 3600,
        key_id="unsigned-direct-call",
        rollout_id="r-test",
    )


def install_command(path: Path, ref: ModelRef | None = None, **update: Any) -> Command:
    return update_command(ref or ref_of(path), path.stat().st_size, **update)


OTA_DEFAULTS: dict[str, Any] = {
    "health_probation_s": 1.0,
    "probation_min_inferences": 30,
    "probation_max_confidence_drop": 0.1,
    "crash_loop_limit": 2,
}


def node_config(
    tmp_path: Path, port: int, model: Path, *, key: Ed25519PrivateKey | None = None, **kw: Any
) -> EdgeConfig:
    ota = {**OTA_DEFAULTS, "state_dir": tmp_path / "ota", **kw.pop("ota", {})}
    if key is not None:
        ota["trusted_keys"] = {key_id_of(key): public_key_b64(key)}
    given = kw.pop("source", {})
    replay = {"kind": "replay", "rate_hz": 250.0, "loop": True}
    source = {**replay, **given} if given.get("kind", "replay") == "replay" else given
    return edge_config(tmp_path, port, model, ota=ota, source=source, routing={"escalate": False}, **kw)


def put_in_content_store(state_dir: Path, path: Path) -> None:
    """As if an earlier download had fetched it: the node installs without downloading."""
    store = state_dir / "models"
    store.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, store / f"{file_sha256(path)}.onnx")


def acks(c: Collector, cmd_id: str) -> list[CommandAck]:
    out = [decode(r.payload, CommandAck) for r in c.on("ack")]
    return [a for a in out if a.cmd_id == cmd_id]


def wait_ack(c: Collector, cmd_id: str, states: set[str], timeout: float = 30.0) -> CommandAck:
    c.wait_for(lambda c: any(a.state in states for a in acks(c, cmd_id)), timeout)
    return next(a for a in acks(c, cmd_id) if a.state in states)


def results(c: Collector) -> list[Answered]:
    """Every answer the node published (each results message is a result/2 of a micro-batch)."""
    for r in c.on("results"):
        decode(r.payload, Results)  # current software: never the older result/1
    return c.answers()


def statuses(c: Collector) -> list[Status]:
    return [decode(r.payload, Status) for r in c.on("status")]


def seq(result: Answered) -> tuple[str, int]:
    boot, _, n = result.inference_id.rpartition("-")
    return boot, int(n)


async def wait_results(c: Collector, at_least: int) -> None:
    await asyncio.to_thread(c.wait_for, lambda c: len(c.answers()) >= at_least, 30.0)


def slots_of(node_slots: SlotManager | None) -> SlotManager:
    assert node_slots is not None
    return node_slots


def state_file(tmp_path: Path) -> SlotState | None:
    return SlotStore(tmp_path / "ota" / "slots").load()


def slot_files(tmp_path: Path) -> set[str]:
    root = tmp_path / "ota" / "slots"
    return {str(p.relative_to(root)) for p in root.glob("[AB]/*")}


# ---- install under load, end to end ----------------------------------------------------------------
async def test_signed_update_switches_under_load_with_no_failed_or_mixed_inference(
    mosquitto: Mosquitto, models: Models, tmp_path: Path
) -> None:
    key = generate_private_key()
    config = node_config(tmp_path, mosquitto.port, models.base.path, key=key, source={"rate_hz": 400.0})
    put_in_content_store(config.ota_state_dir, models.better.path)
    old, new = demo_ref(models.base), demo_ref(models.better)
    command = sign_command(install_command(models.better.path, new), key)
    with Collector(mosquitto.host, mosquitto.port, [f"fleet/{FLEET}/{DEVICE}/#"]) as c:
        async with RunningNode(config) as node:
            await wait_connected(node)
            await wait_results(c, 300)
            await asyncio.to_thread(c.publish, CMD_TOPIC, encode(command))
            installed = await asyncio.to_thread(wait_ack, c, command.cmd_id, {"installed", "health_failed", "failed"})
            assert installed.state == "installed", installed.reason
            switched_at = len(c.answers())
            await wait_results(c, switched_at + 300)
            done = await asyncio.to_thread(wait_ack, c, command.cmd_id, {"done", "rolled_back"})
            slots = slots_of(node.slots)
            pipeline = slots.pipeline
        await asyncio.to_thread(c.wait_for, lambda c: len(c.answers()) >= pipeline.processed)
        got = sorted(results(c), key=seq)
        batches = [[seq(a)[1] for a in Answered.of(r.message())] for r in c.on("results")]
        states = [a.state for a in acks(c, command.cmd_id)]
        tele = [decode(r.payload, Telemetry) for r in c.on("telemetry")]
        status = statuses(c)
    assert done.state == "done", done.reason
    assert states[-3:] == ["installing", "installed", "done"], states
    assert (installed.active_slot, done.active_slot, done.rollout_id) == ("B", "B", "r-test")
    # Zero failed inferences: every input the replay emitted has a result, no gap, no error.
    assert len({r.inference_id for r in got}) == len(got) == pipeline.processed
    assert [seq(r)[1] for r in got] == list(range(1, len(got) + 1))
    assert pipeline.model_stats(old.sha256).errors == pipeline.model_stats(new.sha256).errors == 0
    # Each result names the model that really computed it (its confidence is that model's top
    # probability for the replayed input), even for a batch that was running during the switch.
    X = load_split().X_test.astype(np.float32)
    top = {ref: Classifier.load(m.path).predict(X).max(axis=1) for ref, m in ((old, models.base), (new, models.better))}
    for r in got:
        i = int((r.source_ref or "").rpartition(":")[2])
        assert abs(r.confidence - float(top[r.model][i])) < 1e-5, (r.inference_id, r.model.version)
    # A results message is one micro-batch on one model: consecutive inputs, in the order taken.
    broken = [b for b in batches if b != list(range(b[0], b[0] + len(b)))]
    assert not broken, broken[:5]
    # Old model, then new model, never back and forth; a batch never mixes them.
    refs = [r.model for r in got]
    assert set(refs) == {old, new}
    first_new = refs.index(new)
    assert first_new > 0 and all(m == new for m in refs[first_new:])
    assert len(got) - first_new >= 300
    # Status and telemetry follow the switch.
    assert status[-1].model == new and status[-1].state == "offline"
    assert any(s.state == "online" and s.model == new for s in status)
    assert tele[-1].model == new
    state = state_file(tmp_path)
    assert state is not None and (state.active, state.previous, state.pending) == ("B", "A", None)
    assert slot_files(tmp_path) == {f"A/{old.sha256}.onnx", f"B/{new.sha256}.onnx"}


# ---- health check failures -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "update", "expected"),
    [
        ("corrupt", {}, "does not load"),
        ("wrong_shape", {}, "input [32] float32 does not match"),
        ("wrong_labels", {}, "labels [a, b, c"),
        ("off_reference", {"health_tolerance": 0.05}, "differ from the shipped reference"),
        ("slow", {"latency_budget_ms": 1.0}, "over the budget of 1.0 ms"),
    ],
)
async def test_unhealthy_model_is_refused_and_the_old_one_keeps_serving(
    mosquitto: Mosquitto, models: Models, tmp_path: Path, case: str, update: dict[str, Any], expected: str
) -> None:
    path: Path = getattr(models, case)
    config = node_config(tmp_path, mosquitto.port, models.base.path)
    old = demo_ref(models.base)
    command = install_command(path, **update)
    with Collector(mosquitto.host, mosquitto.port, [f"fleet/{FLEET}/{DEVICE}/#"]) as c:
        async with RunningNode(config) as node:
            await wait_connected(node)
            await wait_results(c, 50)
            await slots_of(node.slots).install(path, command)
            failed = await asyncio.to_thread(wait_ack, c, command.cmd_id, {"health_failed", "installed", "failed"})
            after = len(c.answers())
            await wait_results(c, after + 50)
            assert node.classifier is not None and node.classifier.info.ref == old
            errors = slots_of(node.slots).pipeline.model_stats(old.sha256).errors
    assert failed.state == "health_failed", failed.reason
    assert failed.reason is not None and expected in failed.reason, failed.reason
    assert failed.model == command.update.model if command.update else False
    assert {r.model for r in results(c)} == {old}
    assert errors == 0
    # The factory model became slot A; nothing of the refused model is left in B.
    state = state_file(tmp_path)
    assert state is None or (state.active, state.pending) == ("A", None)
    assert not any(f.startswith("B/") for f in slot_files(tmp_path))


# ---- probation ---------------------------------------------------------------------------------
async def test_a_less_confident_model_is_rolled_back_after_the_switch(
    mosquitto: Mosquitto, models: Models, tmp_path: Path
) -> None:
    config = node_config(tmp_path, mosquitto.port, models.base.path, ota={"health_probation_s": 20.0})
    old, bad = demo_ref(models.base), demo_ref(models.bad)
    command = install_command(models.bad.path, bad)
    with Collector(mosquitto.host, mosquitto.port, [f"fleet/{FLEET}/{DEVICE}/#"]) as c:
        async with RunningNode(config) as node:
            await wait_connected(node)
            await wait_results(c, 100)  # the old model's baseline
            await slots_of(node.slots).install(models.bad.path, command)
            rolled = await asyncio.to_thread(wait_ack, c, command.cmd_id, {"rolled_back", "done", "health_failed"})
            after = len(c.answers())
            await wait_results(c, after + 50)
            assert node.classifier is not None and node.classifier.info.ref == old
        got = sorted(results(c), key=seq)
        states = [a.state for a in acks(c, command.cmd_id)]
    assert rolled.state == "rolled_back", rolled.reason
    assert states == ["installing", "installed", "rolled_back"]
    assert rolled.reason is not None and "mean confidence" in rolled.reason, rolled.reason
    assert rolled.active_slot == "A" and rolled.model == bad
    # Old, then the bad model, then the old one again: at most one stretch of each.
    runs = [got[0].model] + [b.model for a, b in itertools.pairwise(got) if a.model != b.model]
    assert runs == [old, bad, old]
    state = state_file(tmp_path)
    assert state is not None and (state.active, state.previous, state.pending) == ("A", None, None)
    assert slot_files(tmp_path) == {f"A/{old.sha256}.onnx"}


def _input(x: np.ndarray, input_id: str) -> bytes:
    message = Input(
        msg_id=new_msg_id(),
        fleet_id=FLEET,
        device_id=DEVICE,
        ts=time.time(),
        input_id=input_id,
        tensor=encode_tensor(x.astype(np.float32)),
    )
    return encode(message)


async def test_a_model_that_raises_on_live_inputs_is_rolled_back_and_inference_goes_on(
    mosquitto: Mosquitto, models: Models, tmp_path: Path
) -> None:
    X = load_split().X_test
    config = node_config(
        tmp_path, mosquitto.port, models.base.path, source={"kind": "mqtt"}, ota={"health_probation_s": 30.0}
    )
    old = demo_ref(models.base)
    command = install_command(models.fragile)
    with Collector(mosquitto.host, mosquitto.port, [f"fleet/{FLEET}/{DEVICE}/#"]) as c:
        async with RunningNode(config) as node:
            await wait_connected(node)
            await slots_of(node.slots).install(models.fragile, command)
            installed = await asyncio.to_thread(wait_ack, c, command.cmd_id, {"installed", "health_failed"})
            assert installed.state == "installed", installed.reason
            strange = X[5].copy()
            strange[0] = 40.0  # in range for the model's input, out of range for its Gather
            inputs = [*(_input(X[i], f"ok-{i}") for i in range(5)), _input(strange, "strange")]
            await asyncio.to_thread(c.publish_many, INPUT_TOPIC, inputs)
            rolled = await asyncio.to_thread(wait_ack, c, command.cmd_id, {"rolled_back", "done"})
            await asyncio.to_thread(c.publish_many, INPUT_TOPIC, [_input(X[i], f"ok-{i}") for i in range(6, 11)])
            await asyncio.to_thread(c.wait_for, lambda c: any(r.inference_id == "ok-10" for r in c.answers()))
            assert node.classifier is not None and node.classifier.info.ref == old
            fragile_stats = slots_of(node.slots).pipeline.model_stats(command.update.model.sha256)  # type: ignore[union-attr]
            assert fragile_stats.errors == 1  # only the strange input, not its batch-mates
        got = {r.inference_id: r for r in results(c)}
        tele = [decode(r.payload, Telemetry) for r in c.on("telemetry")]
    assert rolled.state == "rolled_back" and rolled.reason is not None
    assert "raised in run" in rolled.reason, rolled.reason
    assert "strange" not in got
    assert {f"ok-{i}" for i in range(11) if i != 5} <= set(got)
    assert all(got[f"ok-{i}"].model == old for i in range(6, 11))
    assert sum(t.rejected_reasons.get("model_error", 0) for t in tele) >= 1


# ---- persistence and crash loop ------------------------------------------------------------------
async def test_installed_model_survives_a_restart_and_can_then_be_rolled_back(
    mosquitto: Mosquitto, models: Models, tmp_path: Path
) -> None:
    config = node_config(tmp_path, mosquitto.port, models.base.path)
    old, new = demo_ref(models.base), demo_ref(models.better)
    command = install_command(models.better.path, new)
    with Collector(mosquitto.host, mosquitto.port, [f"fleet/{FLEET}/{DEVICE}/#"]) as c:
        async with RunningNode(config) as node:
            await wait_connected(node)
            await wait_results(c, 50)
            await slots_of(node.slots).install(models.better.path, command)
            done = await asyncio.to_thread(wait_ack, c, command.cmd_id, {"done", "rolled_back", "health_failed"})
        assert done.state == "done", done.reason
        births = len([s for s in statuses(c) if s.state == "online"])
        async with RunningNode(config) as node:
            assert node.classifier is not None and node.classifier.info.ref == new
            await wait_connected(node)
            await asyncio.to_thread(c.wait_for, lambda c: len([s for s in statuses(c) if s.state == "online"]) > births)
            n = len(c.answers())
            await wait_results(c, n + 30)
            later = sorted(results(c), key=seq)[-30:]
            # After the restart the old model is only on disk (slot A): a rollback loads it from there.
            rollback = rollback_command()
            await slots_of(node.slots).rollback(rollback)
            back = await asyncio.to_thread(wait_ack, c, rollback.cmd_id, {"rolled_back", "failed"})
            assert node.classifier is not None and node.classifier.info.ref == old
    assert next(s for s in reversed(statuses(c)) if s.state == "online" and s.model == new)
    assert {r.model for r in later} == {new}
    assert (back.state, back.active_slot, back.model) == ("rolled_back", "A", old), back.reason
    state = state_file(tmp_path)
    assert state is not None and (state.active, state.previous, state.pending) == ("A", None, None)


async def test_a_clean_restart_during_probation_resumes_it_without_counting_a_crash(
    mosquitto: Mosquitto, models: Models, tmp_path: Path
) -> None:
    long = node_config(tmp_path, mosquitto.port, models.base.path, ota={"health_probation_s": 300.0})
    short = node_config(tmp_path, mosquitto.port, models.base.path, ota={"health_probation_s": 0.5})
    new = demo_ref(models.better)
    command = install_command(models.better.path, new)
    with Collector(mosquitto.host, mosquitto.port, [f"fleet/{FLEET}/{DEVICE}/#"]) as c:
        async with RunningNode(long) as node:
            await wait_connected(node)
            await slots_of(node.slots).install(models.better.path, command)
            await asyncio.to_thread(wait_ack, c, command.cmd_id, {"installed"})
        stopped = state_file(tmp_path)
        async with RunningNode(short) as node:
            restarted = state_file(tmp_path)
            done = await asyncio.to_thread(wait_ack, c, command.cmd_id, {"done", "rolled_back"})
            assert node.classifier is not None and node.classifier.info.ref == new
    assert stopped is not None and stopped.pending is not None and stopped.pending.boot_attempts == 0
    assert restarted is not None and restarted.pending is not None and restarted.pending.boot_attempts == 1
    assert (done.state, done.active_slot, done.model) == ("done", "B", new), done.reason
    final = state_file(tmp_path)
    assert final is not None and (final.active, final.previous, final.pending) == ("B", "A", None)


def _write_toml(tmp_path: Path, port: int, factory: Path, key: Ed25519PrivateKey) -> Path:
    return write_edge_config(
        tmp_path,
        port,
        factory,
        device={"fleet_id": FLEET, "device_id": DEVICE},
        routing={"escalate": False},
        source={"kind": "replay", "rate_hz": 100},
        ota={
            "state_dir": tmp_path / "ota",
            "health_probation_s": 600,
            "crash_loop_limit": 2,
            "trusted_keys": {key_id_of(key): public_key_b64(key)},
        },
    )


def test_crash_loop_after_a_switch_goes_back_to_the_previous_slot(
    mosquitto: Mosquitto, models: Models, tmp_path: Path
) -> None:
    key = generate_private_key()
    config_file = _write_toml(tmp_path, mosquitto.port, models.base.path, key)
    put_in_content_store(tmp_path / "ota", models.better.path)
    old, new = demo_ref(models.base), demo_ref(models.better)
    command = sign_command(install_command(models.better.path, new), key)
    log_path = tmp_path / "node.log"
    with Collector(mosquitto.host, mosquitto.port, [f"fleet/{FLEET}/{DEVICE}/#"]) as c:

        def births_since(started_after: float) -> list[Status]:
            # A run's own statuses: a status from an earlier run may still arrive late (the outbox
            # delivers at least once, and a killed run's unacked messages go out again).
            return [s for s in statuses(c) if s.state == "online" and (s.started_at or 0) > started_after]

        # Run 1: installs and switches, then dies with the new model on probation.
        with run_edge_node(config_file, log_path) as proc:
            c.wait_for(lambda c: len(births_since(0)) >= 1, 30)
            run1 = births_since(0)[0].started_at or 0
            c.publish(CMD_TOPIC, encode(command))
            installed = wait_ack(c, command.cmd_id, {"installed", "health_failed", "failed"}, 60)
            assert installed.state == "installed", installed.reason
            proc.kill()
        # Run 2: starts on the new model (one death so far, limit 2), dies again.
        with run_edge_node(config_file, log_path) as proc:
            c.wait_for(lambda c: len(births_since(run1)) >= 1, 30)
            (birth2, *_) = births_since(run1)
            assert birth2.model == new
            state = state_file(tmp_path)
            assert state is not None and state.pending is not None and state.pending.boot_attempts == 2
            proc.kill()
        # Run 3: two deaths on probation: back on slot A and the command is acked rolled_back.
        run2 = birth2.started_at or 0
        with run_edge_node(config_file, log_path) as proc:
            rolled = wait_ack(c, command.cmd_id, {"rolled_back", "done"}, 30)
            c.wait_for(lambda c: len(births_since(run2)) >= 1, 30)
            assert {b.model for b in births_since(run2)} == {old}
            stop(proc)
    assert rolled.state == "rolled_back" and rolled.reason is not None, rolled
    assert "crash loop" in rolled.reason and rolled.active_slot == "A" and rolled.model == new
    state = state_file(tmp_path)
    assert state is not None and (state.active, state.previous, state.pending) == ("A", None, None)
    assert slot_files(tmp_path) == {f"A/{old.sha256}.onnx"}


# ---- rollback command ----------------------------------------------------------------------------
async def test_rollback_commands_return_to_the_previous_slot(
    mosquitto: Mosquitto, models: Models, tmp_path: Path
) -> None:
    key = generate_private_key()
    config = node_config(tmp_path, mosquitto.port, models.base.path, key=key, ota={"health_probation_s": 30.0})
    put_in_content_store(config.ota_state_dir, models.better.path)
    old, new = demo_ref(models.base), demo_ref(models.better)
    update = sign_command(install_command(models.better.path, new), key)
    during, after = (sign_command(rollback_command(), key) for _ in range(2))
    with Collector(mosquitto.host, mosquitto.port, [f"fleet/{FLEET}/{DEVICE}/#"]) as c:
        async with RunningNode(config) as node:
            await wait_connected(node)
            await wait_results(c, 50)
            # A rollback while the new model is on probation ends it: both commands say rolled_back.
            await asyncio.to_thread(c.publish, CMD_TOPIC, encode(update))
            assert (await asyncio.to_thread(wait_ack, c, update.cmd_id, {"installed", "health_failed"})).state == (
                "installed"
            )
            await asyncio.to_thread(c.publish, CMD_TOPIC, encode(during))
            first = await asyncio.to_thread(wait_ack, c, during.cmd_id, {"rolled_back", "failed"})
            update_end = await asyncio.to_thread(wait_ack, c, update.cmd_id, {"rolled_back", "done"})
            assert node.classifier is not None and node.classifier.info.ref == old
            # Nothing left to go back to.
            await asyncio.to_thread(c.publish, CMD_TOPIC, encode(after))
            second = await asyncio.to_thread(wait_ack, c, after.cmd_id, {"rolled_back", "failed"})
            n = len(c.answers())
            await wait_results(c, n + 30)
        later = sorted(results(c), key=seq)[-20:]
    assert (first.state, first.active_slot, first.model) == ("rolled_back", "A", old), first.reason
    assert update_end.state == "rolled_back" and update_end.reason == f"rolled back by command {during.cmd_id}"
    assert second.state == "failed" and second.reason == "no previous model to roll back to"
    assert {r.model for r in later} == {old}
    state = state_file(tmp_path)
    assert state is not None and (state.active, state.previous, state.pending) == ("A", None, None)


# ---- the health check itself ----------------------------------------------------------------------
def test_health_check_uses_the_shipped_reference_else_recent_inputs(models: Models) -> None:
    current = Classifier.load(models.base.path)
    policy = HealthPolicy(tolerance=0.05, latency_budget_ms=50.0, latency_runs=20)
    shipped = check_health(Classifier.load(models.better.path), current, None, policy)
    assert shipped.ok and shipped.reference == "metadata", shipped.reason
    assert shipped.max_abs_diff is not None and shipped.max_abs_diff < 1e-5
    recent = load_split().X_test[:16].astype(np.float32)
    unshipped = check_health(Classifier.load(models.no_reference), current, recent, policy)
    assert unshipped.ok and unshipped.reference == "recent inputs" and unshipped.max_abs_diff is None
    assert "16 reference input(s)" in unshipped.reason
    nan = check_health(Classifier.load(models.nan_out), current, None, policy)
    assert not nan.ok and "NaN/inf output" in nan.reason, nan.reason


def test_example_config_carries_the_install_keys_and_bad_values_are_named(tmp_path: Path, models: Models) -> None:
    example = Path(__file__).parents[1] / "examples" / "edge.toml"
    env = {"EDGE_NODE__MODEL__PATH": str(models.base.path), "EDGE_NODE__OUTBOX__PATH": str(tmp_path / "o.sqlite")}
    config = load_config(example, env)
    assert (config.ota.health_probation_s, config.ota.crash_loop_limit) == (60.0, 3)
    with pytest.raises(ConfigError, match=r"\[ota\] crash_loop_limit must be at least 1"):
        load_config(example, {**env, "EDGE_NODE__OTA__CRASH_LOOP_LIMIT": "0"})


# ---- boot from the slot state ----------------------------------------------------------------------
def _load(path: Path) -> Classifier:
    return Classifier.load(path)


def test_boot_falls_back_when_the_state_or_the_active_file_is_damaged(models: Models, tmp_path: Path) -> None:
    store = SlotStore(tmp_path / "slots")
    a = store.stage(models.base.path, "A", demo_ref(models.base))
    b = store.stage(models.better.path, "B", demo_ref(models.better))
    store.save(SlotState(active="B", slots={"A": a, "B": b}, previous="A"))
    assert boot_slots(store, models.base.path, _load, 3).classifier.info.ref == demo_ref(models.better)
    # The active file changed on disk: its sha no longer matches, so the previous slot serves.
    os.unlink(store.path(b))
    shutil.copyfile(models.bad.path, store.path(b))
    boot = boot_slots(store, models.base.path, _load, 3)
    assert boot.classifier.info.ref == demo_ref(models.base)
    state = store.load()
    assert state is not None and (state.active, state.previous, set(state.slots)) == ("A", None, {"A"})
    assert {p.name for p in (tmp_path / "slots").glob("[AB]/*")} == {f"{models.base.sha256}.onnx"}
    # An unreadable state file is set aside and the factory model starts.
    (tmp_path / "slots" / STATE_FILE).write_text("{not json")
    boot = boot_slots(store, models.better.path, _load, 3)
    assert boot.state is None and boot.classifier.info.ref.sha256 == models.better.sha256
    assert list((tmp_path / "slots").glob(f"{STATE_FILE}.corrupt-*"))
