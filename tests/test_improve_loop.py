"""The improvement loop end to end in one process against a real SQLite registry, the real trainer
program (`python -m demokit.retrain`), real INT8 quantization and the rollout tables: a candidate that
passes the gate gets a canary rollout, one that fails never does, and a worker that dies mid-loop is
replaced by another that resumes at the recorded phase."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import insert

from cloud_bridge.cli import main as cli_main
from cloud_bridge.config import load_config
from cloud_bridge.improve.driver import ImproveDriver
from cloud_bridge.improve.escalation_value import EscalationAdvice
from cloud_bridge.improve.policy import AutoPolicy, auto_start
from cloud_bridge.improve.store import LoopStore, NewLoop
from cloud_bridge.models.lineage import get_lineage
from cloud_bridge.models.store import ModelStore
from cloud_bridge.registry import DriftEpisodeRow, Registry
from cloud_bridge.rollout.store import RolloutStore
from cloud_bridge.samples.export import ExportFilter, ExportOptions, export_resuming
from cloud_bridge.samples.labels import import_labels
from demokit.dataset import DigitsSplit
from demokit.drift import rotate
from demokit.labelers import StandInLabelingTeam
from demokit.models import DemoModel
from devservers import VictoriaMetrics
from schemas import new_msg_id
from tests.config_files import write_bridge_config
from tests.loop_helpers import FLEET, archive_samples
from tests.processes import CLOUD_BRIDGE

pytestmark = pytest.mark.timeout(300)
DEVICE = "dev-4"


@dataclass
class Setup:
    toml: Path
    registry: Registry
    store: ModelStore
    work: Path


@pytest.fixture
async def labeled(tmp_path: Path, demo_models: dict[str, DemoModel], digits: DigitsSplit) -> AsyncIterator[Setup]:
    async with _labeled(tmp_path, demo_models, digits) as setup:
        yield setup


@contextlib.asynccontextmanager
async def _labeled(
    tmp_path: Path,
    demo_models: dict[str, DemoModel],
    digits: DigitsSplit,
    url: str | None = None,
    influx: str | None = None,
) -> AsyncIterator[Setup]:
    """The drifted device's 250 rotated samples archived, exported, labeled by the stand-in, imported."""
    toml = write_bridge_config(
        tmp_path,
        registry={"url": url} if url else None,
        influx={"url": influx, "flush_interval_s": 0.05} if influx else None,
    )
    config = load_config(toml)
    registry = Registry(config.registry_url)
    await registry.create()
    store = ModelStore(config.model_store_dir, registry)
    edge = await store.add(demo_models["edge"].path)
    await store.add(demo_models["cloud"].path)
    rng = np.random.default_rng(1)
    pick = rng.permutation(len(digits.y_train))[:250]
    x = rotate(np.asarray(digits.X_train)[pick], 20)
    truth = await archive_samples(registry, edge, x, np.asarray(digits.y_train)[pick], DEVICE)
    out = tmp_path / "export"
    await export_resuming(registry, ExportFilter(), ExportOptions(out_dir=out, label_studio=True), resume=True)
    team = StandInLabelingTeam(truth, [str(d) for d in range(10)], error_rate=0.02)
    team.label_export(out / "label-studio.json", tmp_path / "labels.json")
    await import_labels(registry, tmp_path / "labels.json")
    try:
        yield Setup(toml, registry, store, tmp_path / "work")
    finally:
        await registry.close()


def _new(**options: object) -> NewLoop:
    return NewLoop(FLEET, (DEVICE,), "digits-edge", "1.0.0", {"stages": [50, 100], **options})


async def test_a_passing_candidate_is_rolled_out_and_a_restart_resumes(
    labeled: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    loops = LoopStore(labeled.registry)
    loop_id = await loops.create(_new(min_gain=0.05, max_loss=0.02))
    now = [1000.0]
    first = ImproveDriver(labeled.registry, labeled.store, labeled.work, "worker-a", lease_s=60, clock=lambda: now[0])
    await first.tick()  # the dataset phase, then worker-a "dies" holding the lease
    loop = await loops.get(loop_id)
    assert loop is not None and loop["phase"] == "train" and loop["dataset_id"]
    second = ImproveDriver(labeled.registry, labeled.store, labeled.work, "worker-b", lease_s=60, clock=lambda: now[0])
    await second.tick()
    assert (await loops.get(loop_id) or {})["phase"] == "train"  # worker-a's lease still holds
    now[0] += 61
    await second.run_until_settled()
    loop = await loops.get(loop_id)
    assert loop is not None and loop["state"] == "running" and loop["phase"] == "watch", loop
    gate = loop["gate"]
    assert gate["passed"] and gate["drifted_candidate"] >= gate["drifted_current"] + 0.05
    assert gate["original_current"] - gate["original_candidate"] <= 0.02
    lineage = await get_lineage(labeled.registry, "digits-edge", loop["candidate_version"])
    assert lineage is not None and lineage.base_version == "1.0.0" and lineage.dataset_id == loop["dataset_id"]
    assert lineage.metrics["human"] > 0 and "demokit.retrain" in lineage.trainer
    rollout = await RolloutStore(labeled.registry).get(loop["rollout_id"])
    assert rollout is not None and rollout["model_version"] == loop["candidate_version"]
    assert rollout["stages"] == [50, 100] and rollout["state"] == "running"
    # The rollout ends (here: rolled back by hand); the loop follows it.
    await RolloutStore(labeled.registry).abort(rollout["id"], "canary worse", rollback=True)
    await second.tick()
    assert (await loops.get(loop_id) or {})["state"] == "rolled_back"
    code = await asyncio.to_thread(cli_main, ["improve", "status", "--config", str(labeled.toml), loop_id[:8]])
    out = capsys.readouterr().out
    assert code == 0 and "gate" in out and "rolled_back" in out and "trained digits-edge" in out
    assert '"human_holdout":' in out and '"pseudo_train": 0' in out


async def test_a_candidate_that_fails_the_gate_is_never_rolled_out(
    labeled: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await asyncio.to_thread(
        cli_main,
        [
            "improve",
            "start",
            "--config",
            str(labeled.toml),
            "--fleet",
            FLEET,
            "--device",
            DEVICE,
            "--base",
            "digits-edge@1.0.0",
            "--min-gain",
            "0.9",
            "--wait",
        ],
    )
    out = capsys.readouterr().out
    assert code == 0 and "gate_failed" in out and "FAILED" in out, out
    assert await RolloutStore(labeled.registry).all() == []
    (loop,) = await LoopStore(labeled.registry).all()
    assert loop["state"] == "gate_failed" and loop["rollout_id"] is None and not loop["gate"]["passed"]
    assert await asyncio.to_thread(cli_main, ["improve", "status", "--config", str(labeled.toml)]) == 0
    assert "gate_failed" in capsys.readouterr().out


async def test_escalation_value_scores_edge_and_cloud_on_human_labels(
    labeled: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["improve", "escalation", "--config", str(labeled.toml), "--cloud", "digits-cloud@1.0.0"]
    assert await asyncio.to_thread(cli_main, args) == 0
    (line,) = [row for row in capsys.readouterr().out.splitlines() if DEVICE in row]
    _, _, version, count, edge, cloud, verdict = line.split()
    assert version == "1.0.0" and int(count) == 250
    assert verdict == ("helps" if float(cloud) > float(edge) else "does_not_help")
    # Demanding a 0.9 gain, the cloud does not help here: stored, replies to this device carry a pause.
    assert await asyncio.to_thread(cli_main, [*args, "--min-gain", "0.9", "--apply", "600"]) == 0
    assert "1 device/version pair(s) told to pause escalations 600 s" in capsys.readouterr().out
    advice = EscalationAdvice()
    await advice.refresh(labeled.registry)
    assert advice.pause_for(FLEET, DEVICE, "1.0.0") == 600.0 and advice.pause_for(FLEET, "dev-2", "1.0.0") is None
    assert await asyncio.to_thread(cli_main, [*args, "--apply", "600"]) == 0  # the default: helps if better
    await advice.refresh(labeled.registry)
    paused = advice.pause_for(FLEET, DEVICE, "1.0.0")
    assert paused == (None if verdict == "helps" else 600.0)


async def test_two_workers_on_postgresql_run_each_phase_once(
    tmp_path: Path, demo_models: dict[str, DemoModel], digits: DigitsSplit, postgres_url: str
) -> None:
    async with _labeled(tmp_path, demo_models, digits, postgres_url) as setup:
        loops = LoopStore(setup.registry)
        loop_id = await loops.create(_new(min_gain=0.05, max_loss=0.02))
        workers = [ImproveDriver(setup.registry, setup.store, setup.work, f"w{i}") for i in range(2)]
        await asyncio.gather(*(w.run_until_settled() for w in workers))
        loop = await loops.get(loop_id)
        assert loop is not None and loop["phase"] == "watch", loop
        events = [e["event"].split()[0] for e in loop["history"]]
        assert events == ["started", "dataset", "trained", "gate", "rollout"], events
        assert len(await RolloutStore(setup.registry).all()) == 1


def _episode(device: str, state: str) -> dict[str, object]:
    return {
        "fleet_id": FLEET, "device_id": device, "model_name": "digits-edge", "model_version": "1.0.0",
        "kind": "input", "episode": 1, "state": state, "alert_msg_id": new_msg_id(), "payload": b"{}",
        "published": True, "created_at": 1.0,
    }  # fmt: skip


async def _drift_alerts(registry: Registry) -> None:
    """Drift episodes as the bridge records them: DEVICE's alert fires, dev-2's fired and resolved."""
    async with registry.engine.begin() as conn:
        rows = [_episode(DEVICE, "firing"), _episode("dev-2", "firing"), _episode("dev-2", "resolved")]
        await conn.execute(insert(DriftEpisodeRow), rows)


async def test_start_from_alerts_takes_the_devices_whose_drift_alert_fires(
    labeled: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    await _drift_alerts(labeled.registry)
    base = ["improve", "start", "--config", str(labeled.toml), "--fleet", FLEET, "--base", "digits-edge@1.0.0"]
    assert await asyncio.to_thread(cli_main, [*base, "--from-alerts", "--min-human", "1000"]) == 1
    assert "250 human labels, 1000 needed" in capsys.readouterr().err
    assert await asyncio.to_thread(cli_main, [*base]) == 2
    assert "--from-alerts" in capsys.readouterr().err
    assert await asyncio.to_thread(cli_main, [*base, "--from-alerts"]) == 0
    assert f"started for {DEVICE}:" in capsys.readouterr().out
    (loop,) = await LoopStore(labeled.registry).all()
    assert loop["devices"] == [DEVICE] and loop["state"] == "running"


async def test_the_worker_resumes_phase_by_phase_and_writes_each_step_to_the_tsdb(
    tmp_path: Path, demo_models: dict[str, DemoModel], digits: DigitsSplit, victoria: VictoriaMetrics
) -> None:
    async with _labeled(tmp_path, demo_models, digits, influx=victoria.url) as setup:
        config = ["--config", str(setup.toml)]
        start = ["improve", "start", *config, "--fleet", FLEET, "--device", DEVICE, "--base", "digits-edge@1.0.0"]
        assert await asyncio.to_thread(cli_main, [*start, "--min-gain", "0.05", "--max-loss", "0.02"]) == 0
        # Each `run --once` is a new worker process's first pass: one phase each, resumed from the registry.
        for phase in ("train", "gate", "rollout", "watch"):
            worker = await asyncio.create_subprocess_exec(*CLOUD_BRIDGE, "improve", "run", *config, "--once")
            assert await worker.wait() == 0
            (loop,) = await LoopStore(setup.registry).all()
            assert loop["phase"] == phase and loop["state"] == "running", loop
    series = {s.name: s for s in victoria.export('{__name__=~"improve_loop.*"}')}
    assert series["improve_loop_phase"].values == [2.0, 3.0, 4.0, 5.0]
    assert series["improve_loop_state"].values == [1.0] * 4
    assert series["improve_loop_drifted_candidate"].values[-1] == pytest.approx(loop["gate"]["drifted_candidate"])
    assert series["improve_loop_phase"].labels["loop"] == loop["id"]


async def test_a_failing_trainer_fails_the_loop_with_its_output_and_abort_stops_one(
    labeled: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    loops = LoopStore(labeled.registry)
    broken = [sys.executable, "-c", "import sys; print('no GPU here'); sys.exit(3)"]
    loop_id = await loops.create(_new(trainer=broken))
    await ImproveDriver(labeled.registry, labeled.store, labeled.work, "w").run_until_settled()
    loop = await loops.get(loop_id)
    assert loop is not None and loop["state"] == "failed" and loop["phase"] == "train"
    assert "exited 3" in loop["reason"] and "no GPU here" in loop["reason"]
    assert await RolloutStore(labeled.registry).all() == []
    other = await loops.create(_new())
    config = ["--config", str(labeled.toml)]
    assert await asyncio.to_thread(cli_main, ["improve", "abort", *config, other[:8]]) == 0
    assert "aborted" in capsys.readouterr().out
    assert (await loops.get(other) or {})["state"] == "aborted"
    assert await asyncio.to_thread(cli_main, ["improve", "abort", *config, other[:8]]) == 0
    assert "not running" in capsys.readouterr().out
    assert await asyncio.to_thread(cli_main, ["improve", "abort", *config, "nope"]) == 1
    assert "no loop with id 'nope'" in capsys.readouterr().err


async def test_the_auto_policy_starts_one_loop_per_drifted_model_and_waits_out_its_cooldown(labeled: Setup) -> None:
    await _drift_alerts(labeled.registry)
    strict = AutoPolicy(FLEET, min_human=1000)
    assert await auto_start(labeled.registry, labeled.store, strict, now=100.0) == []  # too few labels
    policy = AutoPolicy(FLEET, min_human=50, cooldown_s=600)
    (loop_id,) = await auto_start(labeled.registry, labeled.store, policy, now=100.0)
    assert await auto_start(labeled.registry, labeled.store, policy, now=101.0) == []  # one is running
    await LoopStore(labeled.registry).abort(loop_id, "test", now=200.0)
    assert await auto_start(labeled.registry, labeled.store, policy, now=700.0) == []  # cooling down
    (again,) = await auto_start(labeled.registry, labeled.store, policy, now=801.0)
    loop = await LoopStore(labeled.registry).get(again)
    assert loop is not None and loop["devices"] == [DEVICE] and loop["base_version"] == "1.0.0"
