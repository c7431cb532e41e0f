"""The automatic policy from the config's `[improve]` section: in a running bridge (`in_bridge = true`,
real Mosquitto, the real trainer, INT8 and gate) and in `cloud-bridge improve run` without `--auto`.
A drifted device's rotated samples are archived, labeled by the stand-in and imported; its drift alert
fires. The bridge starts the loop by itself with [improve]'s options and drives it to its rollout, which
begins with a shadow stage (the loop's default stages); a clean stop hands the loop's lease back."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import insert

from cloud_bridge.app import running_bridge
from cloud_bridge.cli import main as cli_main
from cloud_bridge.config import BridgeConfig, ImproveConfig, MqttConfig, load_config
from cloud_bridge.improve.store import LoopStore
from cloud_bridge.models.store import ModelStore
from cloud_bridge.registry import DriftEpisodeRow, Registry
from cloud_bridge.rollout.store import RolloutStore
from cloud_bridge.samples.export import ExportFilter, ExportOptions, export_resuming
from cloud_bridge.samples.labels import import_labels
from demokit.dataset import DigitsSplit
from demokit.drift import rotate
from demokit.labelers import StandInLabelingTeam
from demokit.models import DemoModel
from devservers import Mosquitto
from schemas import new_msg_id
from tests.config_files import write_bridge_config
from tests.loop_helpers import FLEET, archive_samples
from tests.poll import wait_for_async
from tests.processes import CLOUD_BRIDGE

pytestmark = pytest.mark.timeout(300)
DEVICE = "dev-4"


@pytest.fixture
async def drifted(tmp_path: Path, demo_models: dict[str, DemoModel], digits: DigitsSplit) -> AsyncIterator[Path]:
    """A config file whose registry holds DEVICE's 200 rotated samples, labeled, and its firing drift alert."""
    toml = write_bridge_config(tmp_path, improve={"auto": True, "fleets": [FLEET], "min_human": 100})
    config = load_config(toml)
    registry = Registry(config.registry_url)
    await registry.create()
    try:
        store = ModelStore(config.model_store_dir, registry)
        edge = await store.add(demo_models["edge"].path)
        pick = np.random.default_rng(2).permutation(len(digits.y_train))[:200]
        x = rotate(np.asarray(digits.X_train)[pick], 20)
        truth = await archive_samples(registry, edge, x, np.asarray(digits.y_train)[pick], DEVICE)
        out = tmp_path / "export"
        await export_resuming(registry, ExportFilter(), ExportOptions(out_dir=out, label_studio=True), resume=True)
        team = StandInLabelingTeam(truth, [str(d) for d in range(10)], error_rate=0.02)
        team.label_export(out / "label-studio.json", tmp_path / "labels.json")
        await import_labels(registry, tmp_path / "labels.json")
        episode = {
            "fleet_id": FLEET, "device_id": DEVICE, "model_name": "digits-edge", "model_version": "1.0.0",
            "kind": "input", "episode": 1, "state": "firing", "alert_msg_id": new_msg_id(), "payload": b"{}",
            "published": True, "created_at": 1.0,
        }  # fmt: skip
        async with registry.engine.begin() as conn:
            await conn.execute(insert(DriftEpisodeRow), [episode])
    finally:
        await registry.close()
    return toml


async def test_the_bridge_starts_and_drives_a_loop_from_its_improve_section(
    drifted: Path, mosquitto: Mosquitto
) -> None:
    base = load_config(drifted)
    improve = ImproveConfig(
        auto=True, in_bridge=True, fleets=(FLEET,), min_human=100, tick_s=0.2, lease_s=30.0,
        min_gain=0.05, max_loss=0.02, window_s=5.0,
    )  # fmt: skip
    config = dataclasses.replace(
        base, mqtt=MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id="bridge-auto"), improve=improve
    )
    registry = Registry(config.registry_url)
    loops = LoopStore(registry)
    try:
        async with running_bridge(config):

            async def watching() -> list[dict[str, object]]:
                return [loop for loop in await loops.all() if loop["phase"] == "watch" or loop["state"] != "running"]

            (loop,) = await wait_for_async(watching, 180, "the bridge's loop at its rollout", until=bool, interval=0.3)
            assert loop["state"] == "running", json.dumps(loop, default=str)
            assert loop["devices"] == [DEVICE] and loop["options"]["min_gain"] == 0.05
            rollout = await RolloutStore(registry).get(str(loop["rollout_id"]))
            # The loop's default rollout: a shadow stage on the whole fleet, then canary stages.
            assert rollout is not None and rollout["stages"] == [-100, 25, 100] and rollout["window_s"] == 5.0
            assert rollout["model_version"] == loop["candidate_version"]
        # Stopped cleanly: the loop's lease is handed back, so another worker goes on at once.
        (after,) = await loops.all()
        assert after["owner"] is None and after["lease_until"] == 0.0
    finally:
        await registry.close()


async def test_improve_run_starts_loops_when_the_config_says_auto(drifted: Path) -> None:
    async def run_once(*flags: str) -> int:
        worker = await asyncio.create_subprocess_exec(*CLOUD_BRIDGE, "improve", "run", "--config", str(drifted), *flags)
        return await worker.wait()

    # One pass of a worker whose config has [improve] auto = true: the policy starts the loop, the
    # driver runs its first phase (the dataset).
    assert await run_once("--once") == 0
    registry = Registry(load_config(drifted).registry_url)
    try:
        (loop,) = await LoopStore(registry).all()
        assert loop["devices"] == [DEVICE] and loop["phase"] == "train" and loop["dataset_id"]
        assert loop["options"]["stages"] == [-100, 25, 100]
        # A second pass starts no second loop for the same model while this one runs.
        assert await run_once("--once", "--tick-s", "1") == 0
        assert len(await LoopStore(registry).all()) == 1
    finally:
        await registry.close()


def test_improve_run_flags_are_checked(drifted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = ["--config", str(drifted), "--once"]
    assert cli_main(["improve", "run", *config, "--fleet", "a/b"]) == 2
    assert "[improve] with the command line's flags: fleets 'a/b' contains '/'" in capsys.readouterr().err
    assert cli_main(["improve", "run", *config, "--tick-s", "0"]) == 2
    assert "--tick-s 0.0 must be > 0" in capsys.readouterr().err


def test_the_config_in_code_passes_the_same_checks() -> None:
    with pytest.raises(ValueError, match="stages = '100,25'"):
        ImproveConfig(stages="100,25").validate()
    assert BridgeConfig().improve == ImproveConfig()
