"""The trainer protocol: the bridge writes a job directory, runs a trainer program, reads a model back.

A trainer is any command (`[improve] trainer`, default `python -m demokit.retrain`) run as
`COMMAND --job DIR/job.json`. The job JSON names, relative to DIR:

    dataset      dataset.npz: `x` float32 [N, features], `y` label strings, `source` human|pseudo
                 (the dataset version's training split; its holdout never reaches the trainer)
    dataset_id   the dataset version's id
    base_model   base.onnx: a copy of the model being improved
    base_data    what the trainer calls its base training data ("digits" for the built-in one)
    out          where to write the float ONNX model (metadata as every program reads it: labels,
                 input spec, output kind, model_version = `version`)
    metrics      where to write a JSON object of the trainer's own metrics (recorded as lineage)
    name, version, seed, oversample, hidden (hidden layer sizes, null: keep the base model's)

Exit 0 with both files written is success; anything else fails the loop's train phase with the
trainer's last output lines as the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud_bridge.errors import BridgeError
from cloud_bridge.samples.datasets import Dataset

DEFAULT_TRAINER = (sys.executable, "-m", "demokit.retrain")
OUTPUT_TAIL = 2000


class TrainerError(BridgeError, RuntimeError):
    """The trainer program failed or wrote no model: the message holds its last output."""


@dataclass(frozen=True)
class TrainJob:
    directory: Path
    name: str
    version: str
    base_model: Path
    base_data: str = "digits"
    seed: int | None = None
    oversample: int = 2
    hidden: tuple[int, ...] | None = None  # None: the base model's architecture


@dataclass(frozen=True)
class Trained:
    model: Path
    metrics: dict[str, Any]
    trainer: str


def write_job(job: TrainJob, dataset: Dataset) -> Path:
    d = job.directory
    d.mkdir(parents=True, exist_ok=True)
    np.savez(
        d / "dataset.npz",
        x=dataset.x_train.astype(np.float32),
        y=np.asarray(dataset.y_train, dtype=str),
        source=np.asarray(dataset.sources, dtype=str),
    )
    shutil.copyfile(job.base_model, d / "base.onnx")
    spec = {
        "dataset": "dataset.npz",
        "dataset_id": dataset.id,
        "base_model": "base.onnx",
        "base_data": job.base_data,
        "out": "model.onnx",
        "metrics": "metrics.json",
        "name": job.name,
        "version": job.version,
        "seed": job.seed,
        "oversample": job.oversample,
        "hidden": list(job.hidden) if job.hidden else None,
    }
    path = d / "job.json"
    path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    return path


async def run_trainer(job: TrainJob, dataset: Dataset, command: tuple[str, ...] = DEFAULT_TRAINER) -> Trained:
    """Write the job, run the trainer on it, and return the model it wrote."""
    job_file = await asyncio.to_thread(write_job, job, dataset)
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            "--job",
            str(job_file),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # A group of its own: a trainer's workers (joblib, torch dataloaders) are stopped with it.
            start_new_session=True,
        )
    except OSError as exc:
        raise TrainerError(f"cannot start trainer {' '.join(command)}: {exc}") from None
    try:
        output, _ = await process.communicate()
    except asyncio.CancelledError:
        # The bridge is stopping (SIGTERM) or the loop's lease was lost: a training left running would
        # hold CPU and memory with nobody to read its model.
        await _stop(process)
        raise
    text = output.decode(errors="replace")[-OUTPUT_TAIL:]
    model, metrics = job.directory / "model.onnx", job.directory / "metrics.json"
    if process.returncode != 0 or not model.is_file() or not metrics.is_file():
        raise TrainerError(f"trainer {' '.join(command)} exited {process.returncode} without a model: {text.strip()}")
    try:
        loaded = json.loads(metrics.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TrainerError(f"trainer wrote {metrics}, which is not JSON: {exc}") from None
    return Trained(
        model=model,
        metrics=loaded if isinstance(loaded, dict) else {"value": loaded},
        trainer=" ".join(command[1:]) or command[0],
    )


STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long


async def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the trainer's process group, SIGKILL it if it has not exited within STOP_GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            # Shielded: this runs while the caller is being cancelled.
            await asyncio.shield(asyncio.wait_for(process.wait(), STOP_GRACE_S))
            return
        except TimeoutError:
            continue
