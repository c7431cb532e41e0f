"""The device package without the demo kit: importing the node loads no training or dataset code;
only a replay source, when one is made, brings the demo kit in."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from edge_node.config import ReplaySourceConfig
from edge_node.input.intake import Intake
from edge_node.input.replay import ReplaySource
from edge_node.input.sources import InputIds

ROOT = Path(__file__).resolve().parents[1]
# The `demo` extra (pyproject.toml): not installed on a device.
DEMO_ONLY = ("demokit", "sklearn", "scipy", "onnx", "matplotlib")

_PROBE = f"""
import json, sys
DEMO_ONLY = {DEMO_ONLY!r}
def loaded():
    return sorted({{name.split(".")[0] for name in sys.modules}} & set(DEMO_ONLY))
import edge_node.app
import edge_node.cli
before = loaded()
from edge_node.config import ReplaySourceConfig
from edge_node.input.intake import Intake
from edge_node.input.replay import ReplaySource
from edge_node.input.sources import InputIds
after_import = loaded()
ReplaySource(Intake(4), InputIds(), ReplaySourceConfig())
print(json.dumps({{"app": before, "replay_imported": after_import, "replay_made": loaded()}}))
"""


def test_importing_the_node_loads_no_demo_code_until_a_replay_source_is_made() -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["app"] == [], f"import edge_node.app loads demo-only packages: {loaded['app']}"
    assert loaded["replay_imported"] == [], loaded["replay_imported"]
    # The control: the same check sees the demo kit once a replay source is made.
    assert {"demokit", "sklearn"} <= set(loaded["replay_made"]), loaded["replay_made"]


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
