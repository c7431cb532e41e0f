"""The built-in trainer of the improvement loop: retrain the demo digits edge model on its base training
data plus a dataset version of labeled field samples, and write an ONNX file with the metadata the edge
needs (labels, input spec, output kind, held-out accuracy, class mix, health reference).

It speaks the trainer protocol of cloud_bridge/improve/trainer.py (any program that does can replace
it): `python -m demokit.retrain --job JOB.json`, where the job names

    dataset      an .npz with `x` (float32 [N, 64]), `y` (label strings) and `source` (human|pseudo)
    base_model   the model being improved: its `train_config` gives the architecture to keep
    base_data    "digits": the demo split the base model was trained and scored on
    out, name, version, metrics   where to write the model and a metrics JSON

The field samples are repeated `oversample` times (default 2) beside the ~1,250 base images, so
a few hundred labels weigh enough against the base set. Seed and epochs are the base model's; the
hidden layers too unless the job names `hidden`: the demo's 12-unit edge model cannot hold both the
upright and the rotated digits (measured with 210 labels: clean accuracy -1.5 points, rotated 0.906),
while 32 units (64->32->10, ~2.4k parameters) keep clean accuracy and reach ~0.93 rotated, so the loop
asks for 32 by default. Reuses demokit's training and export code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from common.files import write_atomic
from demokit.dataset import DigitsSplit
from demokit.export import class_mix, predict, set_health_reference, set_metadata, to_onnx
from demokit.models import load_split, read_model_card
from demokit.training import TrainConfig, train

DEFAULT_OVERSAMPLE = 2


def _base_config(base_model: Path, name: str, version: str, seed: int | None, hidden: list[int] | None) -> TrainConfig:
    card = read_model_card(base_model)
    recorded: dict[str, Any] = json.loads(card.train_config) if card.train_config else {}
    config = TrainConfig(
        kind="edge",
        name=name,
        version=version,
        hidden=tuple(hidden or recorded.get("hidden", (12,))),
        output_kind=card.output_kind,
        seed=int(recorded.get("seed", 0)),
        max_iter=int(recorded.get("max_iter", 200)),
        calibrate=bool(recorded.get("calibrate", False)),
    )
    return config if seed is None else replace(config, seed=seed)


def retrain(job: dict[str, Any], root: Path) -> dict[str, Any]:
    """Train per `job` (paths relative to `root`); returns the metrics it also writes."""
    started = time.perf_counter()
    if job.get("base_data", "digits") != "digits":
        raise SystemExit(f"demokit.retrain: base_data {job['base_data']!r} unknown: only 'digits' is built in")
    split = load_split()
    out = root / job["out"]
    config = _base_config(root / job["base_model"], job["name"], job["version"], job.get("seed"), job.get("hidden"))
    with np.load(root / job["dataset"], allow_pickle=False) as data:
        x = np.asarray(data["x"], dtype=np.float32).reshape(-1, split.X_train.shape[1])
        labels = [str(v) for v in data["y"]]
        sources = [str(v) for v in data["source"]]
    index = {label: i for i, label in enumerate(split.labels)}
    unknown = sorted({label for label in labels if label not in index})
    if unknown:
        raise SystemExit(f"demokit.retrain: labels {unknown} are not digits 0-9")
    y = np.asarray([index[label] for label in labels], dtype=np.int64)
    repeat = int(job.get("oversample", DEFAULT_OVERSAMPLE))
    combined = DigitsSplit(
        X_train=np.concatenate([split.X_train, *([x] * repeat)]) if len(x) else split.X_train,
        y_train=np.concatenate([split.y_train, *([y] * repeat)]) if len(y) else split.y_train,
        X_test=split.X_test,
        y_test=split.y_test,
    )
    # The copies of one field sample share a calibration fold (demokit/training.py).
    base = len(split.y_train)
    groups = np.concatenate([np.arange(base), *([base + np.arange(len(x))] * repeat)]) if len(x) else None
    trained = train(config, combined, groups)
    model = to_onnx(config, trained.layers, split.labels)
    predictions = predict(model.SerializeToString(), out, split.X_test)
    accuracy = float(np.mean(predictions == split.y_test))
    mix = class_mix(predictions, split.labels)
    set_metadata(model, config, split.labels, accuracy, mix, temperature=trained.temperature)
    set_health_reference(model, out, config.output_kind, split)
    metrics = {
        "trainer": "demokit.retrain",
        "base_test_accuracy": round(accuracy, 6),
        "field_samples": len(x),
        "human": sources.count("human"),
        "pseudo": sources.count("pseudo"),
        "oversample": repeat,
        "hidden": list(config.hidden),
        "temperature": trained.temperature,
        "seconds": round(time.perf_counter() - started, 3),
    }
    from onnx import helper

    props = {p.key: p.value for p in model.metadata_props}
    props["retrain"] = json.dumps({**metrics, "dataset_id": job.get("dataset_id"), "seconds": None}, sort_keys=True)
    helper.set_model_props(model, dict(sorted(props.items())))
    write_atomic(out, model.SerializeToString())
    write_atomic(root / job["metrics"], json.dumps(metrics, sort_keys=True).encode())
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demokit.retrain",
        description="Retrain the demo digits edge model on its base data plus a labeled dataset version "
        "(the improvement loop's built-in trainer; see cloud_bridge/improve/trainer.py for the job format).",
    )
    parser.add_argument("--job", type=Path, required=True, help="the job JSON the bridge wrote")
    args = parser.parse_args(argv)
    job = json.loads(args.job.read_text(encoding="utf-8"))
    metrics = retrain(job, args.job.parent)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
