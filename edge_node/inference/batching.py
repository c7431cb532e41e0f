"""How much work the pipeline forms at once: inputs per batch, inputs held in the intake, and
which finished batches share one outbox commit.

Inputs are taken from the queue as they come: when one waits alone it runs alone (batch-1 latency
is not traded away), when many wait they run as one batch of up to `max_batch` and about
BATCH_JOB_S of measured model time; a model that takes one input per run gets them as a serial job
instead (SERIAL_JOB_S). The intake is sized to a few such batches (`intake_bound`), and under load
consecutive finished batches share one commit (`CommitGroup`, COMMIT_GROUP_S).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from edge_node.inference.runcost import RunCost

# Under load, consecutive batches share one commit: each commit costs a hop to the SQLite writer
# and back (~200 µs of CPU per batch on a 2-vCPU VM, as much as a 0.4 ms model's run), whatever its
# size. A group is committed as soon as the pipeline has nothing more in inference or queued (so an
# input alone is never held back), and at the latest COMMIT_GROUP_S after its first batch finished
# (a timer: a slow model's next run does not hold the last one's results back).
COMMIT_GROUP_S = 0.002
# How many inputs the next batch takes, when they wait: as many as fit in about BATCH_JOB_S of
# measured model time, up to `[model] max_batch`. A cheap model gets large batches (the loop's
# work per batch, ~150 µs of numpy and Python whatever its size, is spread over more inputs: the
# demo model's pipeline went from 1.0x to 1.3x raw batch-1 throughput at 128, 1.65x at 256), an
# expensive one batches no longer than BATCH_JOB_S (the latency an input may wait for its
# batch-mates, and what the SIGTERM drain waits for). Measured from batches of one upwards: the
# first batch after a start or a model switch is a single input, each run's cost per input sizes
# the next.
BATCH_JOB_S = 0.02
# A model that takes one input per run (max_batch = 1, or a fixed batch dimension of 1) gets, when
# inputs wait, several of them as one job, run one after the other (a serial job): one hand-off to
# the worker and back, and one pass of routing, results and commit, per job instead of per input.
# Each model run still takes one input. A job is sized by the measured run cost to take about
# SERIAL_JOB_S (as long as a batch may take), at most MAX_SERIAL_ROWS inputs; its answers leave
# together, so the first waits for the others, only ever while inputs are backed up (a lone input
# is a job of one). Between two jobs the worker idles ~100-250 µs on a 2-vCPU VM (it hands the
# result back and waits for the GIL while the loop routes the job before), and the loop's work per
# job slows the model's run on the other vCPU: with the 2 ms MLP of bench/edge_pipeline.py, 5 ms
# jobs (2 inputs) lost 5-10% of the model's throughput, 20 ms jobs (8-10 inputs) 1-3%.
SERIAL_JOB_S = 0.02
MAX_SERIAL_ROWS = 64
# The intake holds this many batches (or serial jobs): enough that the next one is waiting when
# the two in inference finish. The pipeline resizes it to the jobs it forms (a model switch may
# change them), so that an overloaded node holds no more inputs back than it needs to...
INTAKE_BATCHES = 4
# ...and no more than this many bytes of input arrays: 4 batches of 256 camera frames (3x224x224
# float32, 600 KB each) would be 600 MB, more than a small device has. A batch takes at most a
# quarter of it (27 such frames).
INTAKE_MAX_BYTES = 64 << 20


def intake_bound(take: int, input_bytes: int) -> int:
    """How many inputs the intake holds for batches (or serial jobs) of `take` inputs of
    `input_bytes` each: INTAKE_BATCHES of them, fewer when that would pass INTAKE_MAX_BYTES, never
    less than one batch."""
    return max(take, min(INTAKE_BATCHES * take, INTAKE_MAX_BYTES // max(input_bytes, 1)))


def job_size(input_bytes: int, cost: RunCost, per_run: int) -> tuple[int, int]:
    """Inputs for the next batch (`per_run` > 1) or serial job: about BATCH_JOB_S (SERIAL_JOB_S)
    of the measured cost per input, at most `per_run` (MAX_SERIAL_ROWS) and a quarter of
    INTAKE_MAX_BYTES. Also the size the intake is planned for: the same, or while nothing was
    measured yet (one input is taken then) the largest allowed, so that a burst at start-up
    is not refused by an intake sized for batches of one."""
    limit, job_s = (per_run, BATCH_JOB_S) if per_run > 1 else (MAX_SERIAL_ROWS, SERIAL_JOB_S)
    limit = max(1, min(limit, INTAKE_MAX_BYTES // (INTAKE_BATCHES * max(input_bytes, 1))))
    row_s = cost.per_row()
    if row_s is None:
        return 1, limit
    take = max(1, min(limit, int(job_s / max(row_s, 1e-9))))
    return take, take


_Batch = TypeVar("_Batch")


class CommitGroup(Generic[_Batch]):
    """Finished batches waiting to share one outbox commit (COMMIT_GROUP_S): `flush` hands them to
    `commit` (which starts their commit task); a timer flushes a group that waited COMMIT_GROUP_S."""

    def __init__(self, commit: Callable[[list[_Batch]], None]) -> None:
        self.batches: list[_Batch] = []
        self.commit: Callable[[list[_Batch]], None] | None = commit
        self._timer: asyncio.TimerHandle | None = None

    def add(self, batch: _Batch) -> None:
        if not self.batches:
            self._timer = asyncio.get_running_loop().call_later(COMMIT_GROUP_S, self.flush)
        self.batches.append(batch)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.batches and self.commit is not None:
            batches, self.batches = self.batches, []
            self.commit(batches)

    def close(self) -> list[_Batch]:
        """Stop the timer; return the batches that were never handed to a commit."""
        if self._timer is not None:
            self._timer.cancel()
        self.commit = None
        batches, self.batches = self.batches, []
        return batches
