"""The device package without the demo kit's weight: importing the node loads no training or dataset
code; a running node with the mqtt source never does either; only a replay source brings the demo
kit in, and even then neither scikit-learn nor scipy (the demo kit reads and drifts the digits
with numpy: bench/footprint.py measures what that saves)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from demokit.models import DemoModel
from devservers import Mosquitto
from edge_node.config import ReplaySourceConfig
from edge_node.input.intake import Intake
from edge_node.input.replay import ReplaySource
from edge_node.input.sources import InputIds

ROOT = Path(__file__).resolve().parents[1]
# The `demo` extra (pyproject.toml): not installed on a device.
DEMO_ONLY = ("demokit", "sklearn", "scipy", "onnx", "matplotlib")
# Demo-kit modules no node loads, whatever its source: training, model building, export.
DEMO_TRAINING = ("demokit.training", "demokit.models", "demokit.export")

_LOADED = f"""
import json, sys
DEMO_ONLY = {DEMO_ONLY!r}
DEMO_TRAINING = {DEMO_TRAINING!r}
def loaded():
    names = set(sys.modules)
    return sorted(({{name.split(".")[0] for name in names}} & set(DEMO_ONLY)) | (names & set(DEMO_TRAINING)))
"""

_PROBE = (
    _LOADED
    + """
import edge_node.app
import edge_node.cli
before = loaded()
from edge_node.config import ReplaySourceConfig
from edge_node.input.intake import Intake
from edge_node.input.replay import ReplaySource
from edge_node.input.sources import InputIds
after_import = loaded()
ReplaySource(Intake(4), InputIds(), ReplaySourceConfig())
print(json.dumps({"app": before, "replay_imported": after_import, "replay_made": loaded()}))
"""
)

# A real node, in a fresh interpreter, answering inputs from its source; then what it loaded.
_RUNNING = (
    _LOADED
    + """
import asyncio, time
from pathlib import Path
import paho.mqtt.client as mqtt
from common.config import from_dict
from edge_node.app import EdgeNode
from edge_node.config import EdgeConfig
from edge_node.errors import ConfigError
from schemas import Input, encode, encode_tensor, new_msg_id
import numpy as np

port, model, work, kind = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
source = {"kind": "mqtt"} if kind == "mqtt" else {"kind": "replay", "rate_hz": 50.0}
tables = {
    "mqtt": {"port": port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
    "device": {"fleet_id": "f1", "device_id": "dev-1"},
    "model": {"path": model},
    "outbox": {"path": work / "outbox.sqlite"},
    "routing": {"escalate": False},
    "uplink": {"results_max_delay_s": 0.0},
    "source": source,
}
config = from_dict(EdgeConfig, tables, work, ConfigError)

async def main():
    node = EdgeNode(config)
    task = asyncio.create_task(node.run())
    async with asyncio.timeout(60):
        await node.ready.wait()
        await node.link.wait_connected()
        if kind == "mqtt":
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
            client.connect("127.0.0.1", port)
            client.loop_start()
            x = np.zeros(64, np.float32)
            for i in range(3):
                message = Input(msg_id=new_msg_id(), fleet_id="f1", device_id="dev-1", ts=time.time(),
                                input_id=f"in-{i}", tensor=encode_tensor(x))
                client.publish("fleet/f1/dev-1/input", encode(message), qos=1).wait_for_publish(10)
        while node.processed < 3:
            await asyncio.sleep(0.02)
        if kind == "mqtt":
            client.loop_stop()
            client.disconnect()
        node.stop()
        await task
    return node.processed

processed = asyncio.run(main())
print(json.dumps({"processed": processed, "loaded": loaded()}))
"""
)


def _run(script: str, *args: str) -> dict[str, list[str]]:
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, list[str]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_importing_the_node_loads_no_demo_code_until_a_replay_source_is_made() -> None:
    loaded = _run(_PROBE)
    assert loaded["app"] == [], f"import edge_node.app loads demo-only packages: {loaded['app']}"
    assert loaded["replay_imported"] == [], loaded["replay_imported"]
    # The control: the same check sees the demo kit once a replay source is made.
    assert loaded["replay_made"] == ["demokit"], loaded["replay_made"]


def test_a_running_mqtt_source_node_loads_no_demo_or_training_code(
    mosquitto: Mosquitto, demo_models: dict[str, DemoModel], tmp_path: Path
) -> None:
    ran = _run(_RUNNING, str(mosquitto.port), str(demo_models["edge"].path), str(tmp_path), "mqtt")
    assert ran["processed"] >= 3
    assert ran["loaded"] == [], f"a running mqtt-source node loaded demo-only code: {ran['loaded']}"


def test_a_running_replay_node_loads_the_demo_kit_but_no_sklearn_scipy_or_training(
    mosquitto: Mosquitto, demo_models: dict[str, DemoModel], tmp_path: Path
) -> None:
    ran = _run(_RUNNING, str(mosquitto.port), str(demo_models["edge"].path), str(tmp_path), "replay")
    assert ran["processed"] >= 3
    # The control of the test above: the same probe sees the demo kit the replay source uses.
    assert ran["loaded"] == ["demokit"], f"a replaying node loaded more than the demo kit: {ran['loaded']}"


async def test_the_replay_source_replays_the_held_out_digits_then_drifts() -> None:
    queue = Intake(maxsize=64)
    config = ReplaySourceConfig(rate_hz=100_000.0, limit=30, loop=False, drift="noise", drift_after=20)
    source = ReplaySource(queue, InputIds(), config)
    async with asyncio.timeout(10):
        await source.run()
    items = queue.get_batch_nowait(64)
    assert len(items) == source.emitted == 30
    assert [item.source_ref for item in items[:2]] == ["replay:0", "replay:1"]
    assert items[20].source_ref == "replay:drift:20" and items[19].source_ref == "replay:19"
    assert all(item.truth in source.labels and item.array is not None for item in items)
    assert items[0].array is not None and items[0].array.shape == (64,)


async def test_the_replay_source_rotates_like_the_demo_kit_without_scipy() -> None:
    """The replayed rotation drift is the demo kit's rotation (numpy, not scipy: same pixels)."""
    from demokit.drift import rotate
    from demokit.models import load_split

    queue = Intake(maxsize=64)
    config = ReplaySourceConfig(rate_hz=100_000.0, limit=5, loop=False, drift="rotation", drift_strength=25.0)
    source = ReplaySource(queue, InputIds(), config)
    async with asyncio.timeout(10):
        await source.run()
    items = queue.get_batch_nowait(64)
    expected = rotate(load_split().X_test[:5], 25.0, backend="scipy")
    got = [item.array for item in items]
    assert all(x is not None for x in got)
    assert abs(expected - got).max() < 1e-4  # type: ignore[operator]
