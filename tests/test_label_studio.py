"""A round trip through a real Label Studio server: create a project, import the tasks `samples export`
wrote, annotate them through its API (answers from the labeling stand-in), export the project as JSON
and import those labels.

Label Studio is not a dependency of the project: its ~1 GB of pinned packages would fight the
project's, and `make test` installs only what requirements.lock pins. The test runs when
LABEL_STUDIO_BIN names the `label-studio` program of its own venv (`python -m venv /opt/ls &&
/opt/ls/bin/pip install label-studio`, about 105 s; the server answers /health about 45 s after it
starts), and is skipped otherwise; the documented-format tests (tests/test_improve_labels.py) always run.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_bridge.config import load_config
from cloud_bridge.models.store import ModelStore
from cloud_bridge.registry import Registry
from cloud_bridge.samples.export import ExportFilter, ExportOptions, export_resuming
from cloud_bridge.samples.labels import import_labels
from demokit.dataset import DigitsSplit
from demokit.drift import rotate
from demokit.labelers import StandInLabelingTeam
from demokit.models import DemoModel
from devservers import ManagedProcess
from devservers.ports import free_port
from tests.config_files import write_bridge_config
from tests.loop_helpers import archive_samples
from tests.poll import wait_for

BIN = os.environ.get("LABEL_STUDIO_BIN")
TOKEN = "0123456789abcdef0123456789abcdef01234567"
pytestmark = [
    pytest.mark.skipif(not BIN, reason="LABEL_STUDIO_BIN is not set: no Label Studio server to round-trip through"),
    pytest.mark.timeout(300),
]
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
    + "".join(f'<Choice value="{d}"/>' for d in range(10))
    + "</Choices></View>"
)


class LabelStudio:
    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Token {TOKEN}")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    assert BIN is not None
    base = tmp_path_factory.mktemp("label-studio")
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(base),
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
    }
    argv = [BIN, "start", "--no-browser", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--username", "labeler@example.com", "--password", "labeler-pass-1", "--user-token", TOKEN]
    with ManagedProcess("label-studio", base / "server.log") as proc:
        proc.launch(argv, env=env)

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for(healthy, 180, lambda: f"Label Studio /health on port {port}\n{proc.log_tail()}", interval=1.0)
        yield LabelStudio(f"http://127.0.0.1:{port}")


async def test_labels_round_trip_through_label_studio(
    tmp_path: Path, label_studio: LabelStudio, demo_models: dict[str, DemoModel], digits: DigitsSplit
) -> None:
    config = load_config(write_bridge_config(tmp_path))
    registry = Registry(config.registry_url)
    await registry.create()
    try:
        edge = await ModelStore(config.model_store_dir, registry).add(demo_models["edge"].path)
        x = rotate(np.asarray(digits.X_test[:20]), 20)
        truth = await archive_samples(registry, edge, x, np.asarray(digits.y_test[:20]), "dev-4")
        out = tmp_path / "export"
        options = ExportOptions(out_dir=out, label_studio=True, image_url_prefix="/data/local-files/?d=export/")
        await export_resuming(registry, ExportFilter(), options, resume=True)
        tasks = json.loads((out / "label-studio.json").read_text())
        project = label_studio.call("POST", "/api/projects", {"title": "edgefleet drift", "label_config": LABEL_CONFIG})
        label_studio.call("POST", f"/api/projects/{project['id']}/import", tasks)
        stored = label_studio.call("GET", f"/api/tasks?project={project['id']}&page_size=100")
        stored = stored["tasks"] if isinstance(stored, dict) else stored
        assert len(stored) == 20
        team = StandInLabelingTeam(truth, [str(d) for d in range(10)], error_rate=0.0)
        for task in stored[:15]:  # five stay unlabeled
            answer = team.annotate([{"data": task["data"]}])[0]["annotations"][0]
            label_studio.call("POST", f"/api/tasks/{task['id']}/annotations", {"result": answer["result"]})
        exported = label_studio.call("GET", f"/api/projects/{project['id']}/export?exportType=JSON")
        (tmp_path / "ls-export.json").write_text(json.dumps(exported))
        stats = await import_labels(registry, tmp_path / "ls-export.json")
        # Label Studio's JSON export leaves unannotated tasks out unless download_all_tasks is set.
        assert (stats.tasks, stats.labeled, stats.unlabeled, stats.new) == (15, 15, 0, 15)
        assert (await import_labels(registry, tmp_path / "ls-export.json")).already_imported
        everything = label_studio.call(
            "GET", f"/api/projects/{project['id']}/export?exportType=JSON&download_all_tasks=true"
        )
        (tmp_path / "ls-all.json").write_text(json.dumps(everything))
        stats = await import_labels(registry, tmp_path / "ls-all.json")
        assert (stats.tasks, stats.labeled, stats.unlabeled, stats.new, stats.unchanged) == (20, 15, 5, 0, 15)
        minimal = label_studio.call("GET", f"/api/projects/{project['id']}/export?exportType=JSON_MIN")
        (tmp_path / "ls-min.json").write_text(json.dumps(minimal))
        stats = await import_labels(registry, tmp_path / "ls-min.json")
        assert (stats.labeled, stats.new, stats.unchanged) == (15, 0, 15), minimal[:1]
    finally:
        await registry.close()
