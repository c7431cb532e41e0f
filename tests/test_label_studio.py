"""A round trip through a real Label Studio server: create a project, import the tasks `samples export`
wrote, annotate them through its API (answers from the labeling stand-in), export the project as JSON
and import those labels.

Label Studio is not a dependency of the project: its ~1 GB of pinned packages would fight the
project's. `make test` (scripts/setup.sh) installs it into a venv of its own, `.venv-label-studio`,
from requirements-label-studio.lock (hashed; about 2 minutes the first time, and again only when
that lock changes), and this test starts `.venv-label-studio/bin/label-studio` on a free port with
its data, and HOME, in a temp dir (it answers /health about 45 s after it starts). LABEL_STUDIO_BIN
names another `label-studio` program instead; with neither (`WITH_LABEL_STUDIO=0 scripts/setup.sh`)
the test is skipped and says how to install it. The documented-format tests
(tests/test_improve_labels.py) always run.
"""

from __future__ import annotations

import json
import os
import shutil
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

ROOT = Path(__file__).resolve().parents[1]
# The venv scripts/setup.sh builds (unless WITH_LABEL_STUDIO=0); LABEL_STUDIO_BIN overrides it.
_INSTALLED = ROOT / ".venv-label-studio" / "bin" / "label-studio"
BIN = os.environ.get("LABEL_STUDIO_BIN") or (str(_INSTALLED) if _INSTALLED.exists() else None)
TOKEN = "0123456789abcdef0123456789abcdef01234567"
pytestmark = [
    pytest.mark.skipif(
        not BIN,
        reason=f"no Label Studio server to round-trip through: {_INSTALLED.relative_to(ROOT)} is missing; "
        "`make test` (scripts/setup.sh without WITH_LABEL_STUDIO=0) installs it, or set LABEL_STUDIO_BIN",
    ),
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


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    """A Label Studio server for this module (stopped after it, freeing its ~300 MB for the rest)."""
    assert BIN is not None
    found = shutil.which(BIN)  # a name on PATH or a path; absolute, since the server runs in its temp dir
    if found is None:
        pytest.fail(f"LABEL_STUDIO_BIN={BIN!r} is not an executable program: name a venv's bin/label-studio")
    program = os.path.abspath(found)
    base = tmp_path_factory.mktemp("label-studio")
    port = free_port()
    # A minimal environment: Label Studio also reads unprefixed names (HOST, PORT, USERNAME, DEBUG...)
    # that a developer's shell may hold. Its database, media and settings go to the temp dir, and so
    # does what it writes under HOME (~/.config/label-studio) or the working directory: nothing lands
    # in the user's home or the checkout. No version check against pypi.org, no usage telemetry.
    # Label Studio asks git for its own version from its package directory, which sits inside this
    # checkout: it would take the project's commit and write a version_.py into its venv. GIT_DIR
    # names no repository, so it finds none. Unbuffered: a failure's log tail shows all it printed.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LC_ALL": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "GIT_DIR": str(base / "no-repository"),
        "HOME": str(base),
        "LABEL_STUDIO_BASE_DATA_DIR": str(base / "data"),
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
    }
    # --internal-host is the address it listens on (default 0.0.0.0); its --host is a public URL.
    argv = [program, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]
    argv += ["--username", "labeler@example.com", "--password", "labeler-pass-1", "--user-token", TOKEN]
    with ManagedProcess("label-studio", base / "server.log") as proc:
        proc.launch(argv, env=env, cwd=base)

        def healthy() -> bool:
            if not proc.alive:
                raise AssertionError(
                    f"Label Studio exited with {proc.returncode} before it answered\n{proc.log_tail()}"
                )
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
