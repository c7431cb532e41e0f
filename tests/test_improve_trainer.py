"""The trainer subprocess (cloud_bridge/improve/trainer.py) does not outlive a cancelled loop: a bridge
stopping mid-training leaves no training running with nobody to read its model."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from cloud_bridge.improve.trainer import TrainerError, TrainJob, run_trainer
from cloud_bridge.samples.datasets import Dataset


def dataset() -> Dataset:
    x = np.zeros((4, 3), np.float32)
    return Dataset("ds-1", x, ["0", "1", "0", "1"], ["human"] * 4, x, ["0", "1", "0", "1"], {"human": 4})


def running_with(marker: str) -> list[int]:
    """Pids of processes whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue  # exited meanwhile
    return found


def wait_running(marker: str, at_least: int, timeout_s: float) -> int:
    """Poll /proc (another process's state has no event to wait on) until at least `at_least` (or, with
    0, none) of the processes with `marker` run; the number found."""
    deadline = time.monotonic() + timeout_s
    while True:
        n = len(running_with(marker))
        if (n >= at_least if at_least else n == 0) or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


async def test_a_cancelled_training_stops_the_trainer_and_its_children(tmp_path: Path) -> None:
    marker = f"trainer-{uuid.uuid4().hex}"
    # The trainer starts a worker of its own, as joblib or a dataloader would, and both ignore nothing.
    code = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', '{marker}-worker'])\n"
        "time.sleep(600)\n"
    )
    base = tmp_path / "base.onnx"
    base.write_bytes(b"not read by this trainer")
    job = TrainJob(tmp_path / "job", "m", "1.0.1", base)
    task = asyncio.create_task(run_trainer(job, dataset(), (sys.executable, "-c", code, marker)))
    assert await asyncio.to_thread(wait_running, marker, 2, 30) == 2, "the trainer and its worker did not start"
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("run_trainer swallowed its cancellation")
    assert await asyncio.to_thread(wait_running, marker, 0, 10) == 0, "the trainer or its worker outlived the loop"


async def test_a_trainer_that_fails_says_so_with_its_output(tmp_path: Path) -> None:
    base = tmp_path / "base.onnx"
    base.write_bytes(b"x")
    job = TrainJob(tmp_path / "job", "m", "1.0.1", base)
    code = "import sys; print('out of labels for class 7'); sys.exit(3)"
    try:
        await run_trainer(job, dataset(), (sys.executable, "-c", code))
    except TrainerError as exc:
        assert "exited 3" in str(exc) and "out of labels for class 7" in str(exc)
    else:
        raise AssertionError("a failed trainer was taken as a success")
    assert (job.directory / "job.json").is_file()  # the job stays for the operator to look at
