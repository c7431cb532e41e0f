"""The loop closed end to end: real Mosquitto, a real bridge (ingest, escalation, OTA, rollout driver) and
two real edge nodes, one of whose inputs rotate 20°. Its uncertain samples reach the archive over MQTT,
are exported as Label Studio tasks, labeled by the stand-in (from the replay's ground truth in the
manifest), imported; `improve start --wait` trains, quantizes, gates and starts the rollout, which the
bridge drives to both devices; the loop ends `promoted` and both devices run the candidate."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from cloud_bridge.app import running_bridge
from cloud_bridge.cli import main as cli_main
from cloud_bridge.config import BridgeConfig, EscalationConfig, MqttConfig, OtaConfig, RolloutConfig
from cloud_bridge.improve.driver import ImproveDriver
from cloud_bridge.improve.store import LoopStore, NewLoop
from cloud_bridge.ota.keys import generate
from cloud_bridge.registry import EscalationAdviceRow, SampleRow
from cloud_bridge.samples.export import read_manifest
from demokit.labelers import StandInLabelingTeam
from demokit.models import DemoModel
from devservers import Mosquitto
from tests.edge_harness import RunningNode, edge_config
from tests.poll import wait_for_async
from tests.rollout_helpers import FLEET, POLL_S, Db, cli_config

pytestmark = pytest.mark.timeout(300)
DRIFTED, CLEAN = "e-drift", "e-clean"
# Loose canary limits: this test is about the loop reaching a rollout and following it to its end; the
# canary comparison itself is tests/test_rollout_e2e.py's.
LOOSE = {
    "*": {
        "max_latency_p95_ratio": 100.0,
        "max_agreement_drop": 1.0,
        "max_escalation_rate_increase": 1.0,
        "max_confidence_drop": 1.0,
        "max_rejection_rate_increase": 1.0,
    }
}


async def test_drift_to_labels_to_a_promoted_model_on_a_live_fleet(
    tmp_path: Path, mosquitto: Mosquitto, demo_models: dict[str, DemoModel]
) -> None:
    key = generate(tmp_path / "keys")
    config = BridgeConfig(
        state_dir=str(tmp_path / "bridge"),
        status_interval_s=60.0,
        mqtt=MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id="bridge-loop"),
        escalation=EscalationConfig(model=str(demo_models["cloud"].path)),
        ota=OtaConfig(signing_key=str(key.private_path), chunk_size=4096),
        rollout=RolloutConfig(tick_s=0.3, lease_s=3.0, window_s=3.0, min_inferences=100, min_answered=5),
    )
    toml = cli_config(tmp_path, config)
    ota = {
        "trusted_keys": {key.key_id: key.public_b64},
        "health_probation_s": 1.0,
        "probation_max_confidence_drop": 1.0,
        "probation_max_error_rate_increase": 1.0,
    }
    async with Db(config) as db, running_bridge(config):
        edge = await db.models.add(demo_models["edge"].path)
        nodes = []
        for index, (device, drift) in enumerate(((DRIFTED, "rotation"), (CLEAN, "none"))):
            nodes.append(
                RunningNode(
                    edge_config(
                        tmp_path / device,
                        mosquitto.port,
                        demo_models["edge"].path,
                        device={"fleet_id": FLEET, "device_id": device},
                        source={"kind": "replay", "rate_hz": 80.0, "loop": True, "seed": index, "drift": drift},
                        sampling={"max_per_minute": 6000},
                        telemetry={"interval_s": 0.5},
                        ota=ota,
                    )
                )
            )
        async with nodes[0], nodes[1]:

            async def drifted_samples() -> int:
                async with db.registry.engine.connect() as conn:
                    query = select(func.count()).where(SampleRow.device_id == DRIFTED)
                    return int((await conn.execute(query)).scalar_one())

            await wait_for_async(drifted_samples, 120, "150 samples of the drifted device", until=lambda n: n >= 150,
                                 interval=POLL_S)  # fmt: skip
            out = tmp_path / "export"
            args = ["samples", "export", "--config", str(toml), "--since", "last", "--device", DRIFTED]
            args += ["--out", str(out), "--format", "label-studio", "--image-url-prefix", "/data/x/", "--quiet"]
            assert await asyncio.to_thread(cli_main, args) == 0
            truth = {e["msg_id"]: e["truth"] for e in read_manifest(out / "manifest.jsonl") if e["truth"] is not None}
            assert len(truth) >= 150  # the replay knows each input's label
            team = StandInLabelingTeam(truth, [str(d) for d in range(10)], error_rate=0.02, budget=300)
            team.label_export(out / "label-studio.json", tmp_path / "labels.json")
            assert (
                await asyncio.to_thread(
                    cli_main, ["samples", "labels", "import", "--config", str(toml), str(tmp_path / "labels.json")]
                )
                == 0
            )
            options = {"stages": [50, 100], "window_s": 3.0, "thresholds": LOOSE, "min_gain": 0.02, "max_loss": 0.03}
            loops = LoopStore(db.registry)
            loop_id = await loops.create(NewLoop(FLEET, (DRIFTED,), edge.name, edge.version, options))
            cloud = demo_models["cloud"].path
            await ImproveDriver(
                db.registry, db.models, tmp_path / "work", "test-worker", cloud_model=cloud
            ).run_until_settled()
            loop = await loops.get(loop_id)
            assert loop is not None and loop["phase"] == "watch", json.dumps(loop, default=str)
            # The cloud model is poor on rotated digits: the gate found it no better than the candidate
            # and told the drifted device to pause escalations on the candidate's version.
            advice = loop["gate"]["escalation"]
            assert advice["verdict"] == "does_not_help" and advice["cloud_accuracy"] < advice["edge_accuracy"], advice
            async with db.registry.engine.connect() as conn:
                t = EscalationAdviceRow
                rows = (await conn.execute(select(t.device_id, t.model_version, t.pause_s))).all()
            assert [(r.device_id, r.model_version, r.pause_s) for r in rows] == [
                (DRIFTED, loop["candidate_version"], advice["pause_s"])
            ]
            rollout = await db.wait_rollout(loop["rollout_id"], lambda r: r["state"] != "running", limit_s=150)
            assert rollout["state"] == "promoted", rollout["reason"]
            await ImproveDriver(db.registry, db.models, tmp_path / "work", "test-worker").tick()
            loop = await loops.get(loop_id)
            assert loop is not None and loop["state"] == "promoted"
            candidate = loop["candidate_version"]

            async def versions() -> dict[str, str | None]:
                return {d.device_id: d.model_version for d in await db.store.fleet(FLEET)}

            await wait_for_async(versions, 60, f"both devices on {candidate}",
                                 until=lambda v: set(v.values()) == {candidate}, interval=POLL_S)  # fmt: skip
