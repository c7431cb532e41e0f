"""A rollout's shadow stage end to end: real Mosquitto, a real bridge (signed commands, OTA chunks, the
rollout driver, the cloud model answering escalations) and two real edge nodes replaying the held-out
digits with their labels.

`--stages shadow:100,100`: both devices fetch the candidate with a signed `shadow_start` and run it beside
their active model on a share of the inputs, reporting `shadow` telemetry. A label-permuted candidate
(it disagrees with the active model on most inputs) fails the shadow stage: the rollout ends
rolled_back, every shadow is stopped, and no device ever received a model_update of it. A retrained
candidate that agrees passes, the shadows are stopped, and the rollout goes on to its canary stage and
installs it on the whole fleet. An operator's abort with --rollback during the shadow stage stops the
shadows (shadow_stop, never `rollback`: no device switched).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cloud_bridge.app import running_bridge
from cloud_bridge.cli import main as cli_main
from cloud_bridge.ota.commands import command_states
from cloud_bridge.ota.keys import GeneratedKey, generate
from demokit.models import DemoModel, build_edge_model
from devservers import Mosquitto
from tests.edge_harness import RunningNode, edge_config
from tests.poll import wait_for_async
from tests.rollout_helpers import FLEET, POLL_S, Db, cli_config
from tests.test_rollout_e2e import bridge_config

pytestmark = pytest.mark.timeout(240)

DEVICES = ["s1", "s2"]
# Evidence, not speed: agreement and accuracy rates need inputs; latency on a shared 2-core test
# machine is noise (the shadow's own cost is measured in bench/edge_pipeline.py).
THRESHOLDS = ("max_latency_p95_ratio=10", "min_answered=100", "shadow:min_shadow_inputs=150")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DemoModel]:
    out = tmp_path_factory.mktemp("shadow_models")
    return {
        "edge": build_edge_model(out, "1.0.0"),
        "cloud": build_edge_model(out, "1.0.0", hidden=(64,), name="digits-cloud"),
        "healthy": build_edge_model(out, "1.1.0", seed=1),
        "permuted": build_edge_model(out, "1.2.0", shuffle_labels=True, max_iter=30),
    }


@contextlib.asynccontextmanager
async def edge_fleet(tmp_path: Path, broker: Mosquitto, model: Path, key: GeneratedKey) -> AsyncIterator[None]:
    ota: dict[str, Any] = {
        "trusted_keys": {key.key_id: key.public_b64},
        "health_probation_s": 1.0,
        "probation_max_confidence_drop": 1.0,
        "probation_max_error_rate_increase": 1.0,
        "shadow_share": 0.5,
    }
    async with contextlib.AsyncExitStack() as stack:
        for index, device in enumerate(DEVICES):
            config = edge_config(
                tmp_path / device,
                broker.port,
                model,
                device={"fleet_id": FLEET, "device_id": device},
                source={"kind": "replay", "rate_hz": 40.0, "loop": True, "seed": index},
                telemetry={"interval_s": 0.5},
                ota=ota,
            )
            await stack.enter_async_context(RunningNode(config))
        yield


async def shadow_rollout(
    tmp_path: Path,
    broker: Mosquitto,
    models: dict[str, DemoModel],
    target: DemoModel,
    capsys: pytest.CaptureFixture[str],
    *thresholds: str,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[Any], dict[str, str | None]]:
    key = generate(tmp_path / "keys")
    config = bridge_config(tmp_path, broker, key, models["cloud"].path)
    toml = cli_config(tmp_path, config)
    async with Db(config) as db:
        await db.models.add(target.path)
        async with running_bridge(config), edge_fleet(tmp_path, broker, models["edge"].path, key):
            await db.wait_devices(len(DEVICES))
            args = ["rollout", "start", "--model", target.name, "--version", target.version]
            args += ["--stages", "shadow:100,100", "--fleet", FLEET, "--config", str(toml)]
            args += ["--window-s", str(config.rollout.window_s), *[f"--thresholds={t}" for t in thresholds]]
            assert await asyncio.to_thread(cli_main, args) == 0
            rid = capsys.readouterr().out.strip()
            final = await db.wait_rollout(
                rid, lambda r: r["state"] != "running" and not r["rollback_pending"], limit_s=150
            )
            devices = await db.store.devices(rid)
            expected = target.version if final["state"] == "promoted" else models["edge"].version

            async def versions() -> dict[str, str | None]:
                return {d.device_id: d.model_version for d in await db.store.fleet(FLEET)}

            running = await wait_for_async(
                versions, 60, f"every device on {expected}", until=lambda v: set(v.values()) == {expected}
            )

            async def stopped() -> list[Any]:
                return await command_states(db.registry, rollout_id=rid)

            # Every shadow_stop acked (the devices stopped their shadow).
            commands = await wait_for_async(
                stopped,
                30,
                "every shadow_stop acked done",
                until=lambda cs: all(c.state == "done" for c in cs if c.action == "shadow_stop"),
                interval=POLL_S,
            )
    return final, devices, commands, running


async def test_a_disagreeing_shadow_is_never_switched_in(
    tmp_path: Path, mosquitto: Mosquitto, models: dict[str, DemoModel], capsys: pytest.CaptureFixture[str]
) -> None:
    final, devices, commands, running = await shadow_rollout(
        tmp_path, mosquitto, models, models["permuted"], capsys, *THRESHOLDS
    )
    assert final["state"] == "rolled_back" and final["stage"] == 0, final["reason"]
    assert final["reason"].startswith("shadow agreement_with_active"), final["reason"]
    shadow = final["last_eval"]["shadow"]
    assert shadow["shadow_inputs"] >= 150 and shadow["shadow_agreement"] < 0.5
    actions = sorted(c.action for c in commands)
    assert actions == ["shadow_start"] * 2 + ["shadow_stop"] * 2, actions  # never a model_update
    assert all(c.state == "done" for c in commands if c.action == "shadow_start")
    assert sorted(d["device_id"] for d in devices) == DEVICES
    assert all(d["rollback_cmd_id"] is not None for d in devices)
    assert running == {d: models["edge"].version for d in DEVICES}


async def test_an_agreeing_shadow_passes_and_the_rollout_goes_on_to_its_canary(
    tmp_path: Path, mosquitto: Mosquitto, models: dict[str, DemoModel], capsys: pytest.CaptureFixture[str]
) -> None:
    healthy = models["healthy"]
    # Two retrained models differ on a few percent of inputs: the accuracy gate is given room for the
    # sampling noise of a few hundred labeled inputs.
    final, devices, commands, running = await shadow_rollout(
        tmp_path, mosquitto, models, healthy, capsys, *THRESHOLDS, "shadow:max_shadow_accuracy_drop=0.1"
    )
    assert final["state"] == "promoted", final["reason"]
    by_action: dict[str, int] = {}
    for c in commands:
        by_action[c.action] = by_action.get(c.action, 0) + 1
    assert by_action == {"shadow_start": 2, "shadow_stop": 2, "model_update": 2}, by_action
    shadow_done = max(c.acked_at or 0 for c in commands if c.action == "shadow_start")
    first_update = min(c.sent_at for c in commands if c.action == "model_update")
    assert first_update > shadow_done  # the canary began after the shadow ran
    # The shadow stage's rows were dropped when it passed: the canary stage (index 1) took both devices.
    assert sorted((d["device_id"], d["stage"], d["state"]) for d in devices) == [(d, 1, "done") for d in DEVICES]
    assert running == {d: healthy.version for d in DEVICES}


async def test_aborting_during_the_shadow_stage_stops_the_shadows_and_installs_nothing(
    tmp_path: Path, mosquitto: Mosquitto, models: dict[str, DemoModel], capsys: pytest.CaptureFixture[str]
) -> None:
    target = models["healthy"]
    key = generate(tmp_path / "keys")
    config = bridge_config(tmp_path, mosquitto, key, models["cloud"].path)
    toml = cli_config(tmp_path, config)
    async with Db(config) as db:
        await db.models.add(target.path)
        async with running_bridge(config), edge_fleet(tmp_path, mosquitto, models["edge"].path, key):
            await db.wait_devices(len(DEVICES))
            args = ["rollout", "start", "--model", target.name, "--version", target.version]
            args += ["--stages", "shadow:100,100", "--fleet", FLEET, "--config", str(toml)]
            args += ["--thresholds=shadow:min_shadow_inputs=100000"]  # it never passes by itself
            assert await asyncio.to_thread(cli_main, args) == 0
            rid = capsys.readouterr().out.strip()
            await db.wait_rollout(rid, lambda r: r["phase"] == "watching", limit_s=60)
            abort = ["rollout", "abort", rid, "--rollback", "--config", str(toml)]
            assert await asyncio.to_thread(cli_main, abort) == 0
            final = await db.wait_rollout(rid, lambda r: not r["rollback_pending"], limit_s=30)

            async def states() -> list[Any]:
                return await command_states(db.registry, rollout_id=rid)

            commands = await wait_for_async(
                states,
                30,
                "every shadow_stop acked done",
                until=lambda cs: sum(c.action == "shadow_stop" and c.state == "done" for c in cs) == len(DEVICES),
                interval=POLL_S,
            )
    assert final["state"] == "aborted"
    assert sorted(c.action for c in commands) == ["shadow_start"] * 2 + ["shadow_stop"] * 2
