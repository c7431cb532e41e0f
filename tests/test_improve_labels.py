"""Labels for archived samples: Label Studio JSON exports (the documented format, written by the
labeling stand-in and by hand), validation that rejects a whole file, idempotent re-imports,
pseudo-labels kept apart, and dataset versions. Real SQLite registry files, real demo models."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from cloud_bridge.cli import main as cli_main
from cloud_bridge.config import load_config
from cloud_bridge.models.store import ModelStore
from cloud_bridge.registry import LabelRow, Registry
from cloud_bridge.samples.datasets import DatasetSpec, create_dataset, load_dataset
from cloud_bridge.samples.export import ExportFilter, ExportOptions, export_resuming
from cloud_bridge.samples.labels import HUMAN, PSEUDO, LabelImportError, import_labels
from cloud_bridge.samples.pseudo import pseudo_label
from demokit.dataset import DigitsSplit
from demokit.drift import rotate
from demokit.labelers import StandInLabelingTeam
from demokit.models import DemoModel
from tests.config_files import write_bridge_config
from tests.loop_helpers import archive_samples

pytestmark = pytest.mark.timeout(120)


async def _setup(tmp_path: Path, demo_models: dict[str, DemoModel], digits: DigitsSplit, n: int = 40):
    toml = write_bridge_config(tmp_path)
    config = load_config(toml)
    registry = Registry(config.registry_url)
    await registry.create()
    store = ModelStore(config.model_store_dir, registry)
    edge = await store.add(demo_models["edge"].path)
    await store.add(demo_models["cloud"].path)
    x = rotate(np.asarray(digits.X_test[:n]), 20)
    truth = await archive_samples(registry, edge, x, np.asarray(digits.y_test[:n]), "dev-4")
    return toml, registry, truth


async def _export(registry: Registry, out: Path) -> Path:
    await export_resuming(
        registry, ExportFilter(), ExportOptions(out_dir=out, label_studio=True, image_url_prefix="/x/"), resume=True
    )
    return out / "label-studio.json"


async def _count(registry: Registry, source: str) -> int:
    async with registry.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).where(LabelRow.source == source))).scalar_one())


async def test_import_validates_the_whole_file_and_is_idempotent(
    tmp_path: Path, demo_models: dict[str, DemoModel], digits: DigitsSplit, capsys: pytest.CaptureFixture[str]
) -> None:
    toml, registry, truth = await _setup(tmp_path, demo_models, digits)
    try:
        tasks_file = await _export(registry, tmp_path / "export")
        team = StandInLabelingTeam(truth, [str(d) for d in range(10)], error_rate=0.0)
        good = tmp_path / "good.json"
        assert team.label_export(tasks_file, good) == 40
        tasks = json.loads(good.read_text())
        # Label Studio keeps skipped ("cancelled") annotations in the export: they must not count.
        tasks[0]["annotations"].append(
            {
                **tasks[0]["annotations"][0],
                "id": 99,
                "was_cancelled": True,
                "result": [{"type": "choices", "from_name": "label", "value": {"choices": ["9"]}}],
                "updated_at": "2099-01-01T00:00:00Z",
            }
        )
        tasks[1]["annotations"] = []  # not labeled yet
        good.write_text(json.dumps(tasks))

        bad = json.loads(good.read_text())
        bad[2]["data"]["msg_id"] = bad[2]["meta"]["msg_id"] = "0190aaaa-0000-7000-8000-000000000000"
        bad[3]["annotations"][0]["result"][0]["value"]["choices"] = ["cat"]
        bad_file = tmp_path / "bad.json"
        bad_file.write_text(json.dumps(bad))
        assert (
            await asyncio.to_thread(cli_main, ["samples", "labels", "import", "--config", str(toml), str(bad_file)])
        ) == 2
        err = capsys.readouterr().err
        assert "nothing imported" in err and "not in the archive" in err and "'cat'" in err
        assert await _count(registry, HUMAN) == 0

        assert (
            await asyncio.to_thread(cli_main, ["samples", "labels", "import", "--config", str(toml), str(good)])
        ) == 0
        assert "39 labeled (39 new" in capsys.readouterr().out
        async with registry.engine.connect() as conn:
            first = (
                await conn.execute(select(LabelRow.label).where(LabelRow.msg_id == tasks[0]["data"]["msg_id"]))
            ).scalar_one()
        assert first == truth[tasks[0]["data"]["msg_id"]]  # the cancelled "9" did not win
        assert (
            await asyncio.to_thread(cli_main, ["samples", "labels", "import", "--config", str(toml), str(good)])
        ) == 0
        assert "imported before" in capsys.readouterr().out
        # The same labels in another file: nothing changes, nothing is duplicated.
        again = tmp_path / "again.json"
        again.write_text(json.dumps(tasks, indent=1))
        stats = await import_labels(registry, again)
        assert (stats.new, stats.changed, stats.unchanged) == (0, 0, 39)
        assert await _count(registry, HUMAN) == 39
        # The export now has nothing new: the next task file is empty.
        assert json.loads((await _export(registry, tmp_path / "export")).read_text()) == []
        with pytest.raises(LabelImportError, match="not a list of tasks"):
            (tmp_path / "obj.json").write_text("{}")
            await import_labels(registry, tmp_path / "obj.json")
    finally:
        await registry.close()


async def test_pseudo_labels_stay_apart_and_datasets_record_their_source(
    tmp_path: Path, demo_models: dict[str, DemoModel], digits: DigitsSplit
) -> None:
    _, registry, truth = await _setup(tmp_path, demo_models, digits, n=60)
    try:
        tasks_file = await _export(registry, tmp_path / "export")
        team = StandInLabelingTeam(truth, [str(d) for d in range(10)], error_rate=0.0, budget=30)
        team.label_export(tasks_file, tmp_path / "labels.json")
        await import_labels(registry, tmp_path / "labels.json")
        config = load_config(tmp_path / "cloud.toml")
        cloud = await ModelStore(config.model_store_dir, registry).get("digits-cloud", "1.0.0")
        stats = await pseudo_label(registry, cloud.path, "digits-cloud@1.0.0", min_confidence=0.5)
        assert stats.considered == 30 and 0 < stats.labeled <= 30
        assert await _count(registry, HUMAN) == 30 and await _count(registry, PSEUDO) == stats.labeled
        ds = await create_dataset(registry, DatasetSpec(devices=("dev-4",), holdout_fraction=0.3, include_pseudo=True))
        data = await load_dataset(registry, ds)
        assert data.counts["pseudo_train"] == stats.labeled
        assert data.counts["human_train"] + data.counts["human_holdout"] == 30 and data.counts["human_holdout"] > 0
        assert len(data.y_holdout) == data.counts["human_holdout"] and data.x_train.shape[1] == 64
        assert data.sources.count(PSEUDO) == stats.labeled  # holdout is human only, pseudo marked as such
        without = await load_dataset(registry, await create_dataset(registry, DatasetSpec(devices=("dev-4",))))
        assert PSEUDO not in without.sources
    finally:
        await registry.close()


async def test_json_min_exports_import_too(
    tmp_path: Path, demo_models: dict[str, DemoModel], digits: DigitsSplit
) -> None:
    _, registry, truth = await _setup(tmp_path, demo_models, digits, n=10)
    try:
        tasks = json.loads((await _export(registry, tmp_path / "export")).read_text())
        # Export -> JSON-MIN: one flat object per task, the data fields beside the choice under its control's name.
        rows = [{**t["data"], "id": i, "annotation_id": i, "annotator": 1, "label": truth[t["data"]["msg_id"]]}
                for i, t in enumerate(tasks[:8])]  # fmt: skip
        rows.append({**tasks[8]["data"], "id": 8})  # not labeled
        (tmp_path / "min.json").write_text(json.dumps(rows))
        stats = await import_labels(registry, tmp_path / "min.json")
        assert (stats.tasks, stats.labeled, stats.unlabeled, stats.new) == (9, 8, 1, 8)
        rows[0]["label"] = "ten"
        (tmp_path / "bad-min.json").write_text(json.dumps(rows))
        with pytest.raises(LabelImportError, match="'ten' is not one of"):
            await import_labels(registry, tmp_path / "bad-min.json")
    finally:
        await registry.close()


def test_the_stand_in_team_answers_after_its_turnaround_with_its_error_rate() -> None:
    tasks = [{"data": {"msg_id": f"m{i}"}, "meta": {}} for i in range(200)]
    team = StandInLabelingTeam({}, [str(d) for d in range(10)], error_rate=0.1, delay_s=4.0, seed=3)
    team.learn({f"m{i}": str(i % 10) for i in range(150)})  # no truth for the last 50: left unannotated
    team.receive(tasks, now=100.0)
    assert team.finished(103.9) == [] and team.pending == 200
    (answered,) = team.finished(104.0)
    assert team.pending == 0 and team.finished(200.0) == []
    labels = {
        t["data"]["msg_id"]: t["annotations"][0]["result"][0]["value"]["choices"][0]
        for t in answered
        if t["annotations"]
    }
    assert len(labels) == team.answered == 150
    wrong = sum(label != str(int(m[1:]) % 10) for m, label in labels.items())
    assert wrong == team.mistakes and 5 <= wrong <= 30  # 10% of 150, seeded
    with pytest.raises(ValueError, match=r"error_rate = 1\.5"):
        StandInLabelingTeam({}, ["0", "1"], error_rate=1.5)
