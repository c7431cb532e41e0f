"""Inputs through a real edge node: the directory source end to end (real broker, model, outbox)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from demokit.dataset import DigitsSplit
from demokit.models import DemoModel
from devservers import Mosquitto
from edge_node.config import EdgeConfig
from edge_node.inference.batching import (
    BATCH_JOB_S,
    INTAKE_BATCHES,
    INTAKE_MAX_BYTES,
    INTAKE_MIN_INPUTS,
    MAX_SERIAL_ROWS,
    SERIAL_JOB_S,
)
from edge_node.inference.model import Classifier
from edge_node.inference.pipeline import Pipeline
from edge_node.inference.runcost import RECENT, REPROBE, RunCost
from edge_node.input.intake import InputItem, Intake
from edge_node.input.sources import DirectorySource, InputIds
from edge_node.routing.escalation import Escalations
from edge_node.routing.sampling import UncertaintySampler
from edge_node.telemetry import Window
from edge_node.uplink.outbox import Outbox, OutMessage
from schemas import Results, Telemetry, Topics, decode_for_topic
from tests.edge_harness import RunningNode, edge_config, wait_connected
from tests.mqtt_collector import Answered, Collector
from tests.poll import wait_for_async

WAIT_S = 20.0


def _names(d: Path, suffix: str = "") -> set[str]:
    return {p.name for p in d.iterdir() if p.name.endswith(suffix)} if d.exists() else set()


async def test_directory_source_processes_each_file_once_and_files_it_by_outcome(
    mosquitto: Mosquitto, demo_models: dict[str, DemoModel], digits: DigitsSplit, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    good = {f"good-{i}.npy": digits.X_test[i].astype(np.float32) for i in range(5)}
    for name, x in good.items():
        np.save(inbox / name, x)
    nan = digits.X_test[5].astype(np.float32).copy()
    nan[7] = np.nan
    np.save(inbox / "nan.npy", nan)
    np.save(inbox / "shape.npy", np.zeros(63, np.float32))
    (inbox / "corrupt.npy").write_bytes(b"\x93NUMPY but not really")
    (inbox / "notes.txt").write_text("not a tensor")
    np.save(inbox / ".partial.npy", digits.X_test[6].astype(np.float32))  # still being written
    bad = {"nan.npy": "nonfinite", "shape.npy": "shape", "corrupt.npy": "undecodable", "notes.txt": "undecodable"}
    done, failed = inbox / "done", inbox / "failed"

    config = edge_config(
        tmp_path,
        mosquitto.port,
        demo_models["edge"].path,
        routing={"escalate": False},
        source={"kind": "directory", "path": inbox, "poll_s": 0.05},
    )
    with Collector(mosquitto.host, mosquitto.port, ["fleet/f1/dev-1/#"]) as c:
        async with RunningNode(config) as node:
            await wait_connected(node)
            await wait_for_async(
                lambda: _names(done), WAIT_S, "the good files in done/", until=lambda names: names == set(good)
            )
            await wait_for_async(
                lambda: _names(failed, ".npy") | _names(failed, ".txt"),
                WAIT_S,
                "bad files in failed/",
                until=lambda names: names >= set(bad),
            )
            # A file dropped while the node runs is picked up too, once.
            late = digits.X_test[7].astype(np.float32)
            np.save(inbox / ".late.npy", late)
            (inbox / ".late.npy").rename(inbox / "late.npy")  # the atomic drop a writer should do
            await wait_for_async(
                lambda: _names(done), WAIT_S, "the late file in done/", until=lambda names: "late.npy" in names
            )
            await asyncio.to_thread(c.wait_for, lambda c: len(c.answers()) >= len(good) + 1)
        await asyncio.to_thread(c.wait_for, lambda c: len(c.on("telemetry")) >= 1)
        messages = [r.message() for r in c.on("results")]
        answers = c.answers()
        telemetry = [m for m in (r.message() for r in c.on("telemetry")) if isinstance(m, Telemetry)]

    assert all(isinstance(m, Results) for m in messages)
    refs = sorted(a.source_ref or "" for a in answers)
    assert refs == sorted(f"file:{name}" for name in [*good, "late.npy"])  # each exactly once
    assert _names(inbox) == {"done", "failed", ".partial.npy"}  # nothing left but the hidden file
    for name, reason in bad.items():
        assert reason in (failed / f"{name}.reason.txt").read_text()
    (tele,) = telemetry
    assert tele.count == len(good) + 1
    assert tele.rejected_reasons == {"nonfinite": 1, "shape": 1, "undecodable": 2}


# ---- the pipeline over a real outbox, without a broker -----------------------------------------


def test_run_cost_goes_inline_only_for_measured_cheap_batches() -> None:
    cost = RunCost(budget_s=100e-6, probe_s=1e-3).for_model("model-a")
    assert not cost.inline(1)  # never measured: the worker thread first
    cost.record(1, 2e-3, inline=False)
    assert not cost.inline(1)  # too slow in the worker to be tried inline
    cost.record(1, 150e-6, inline=False)  # the least recent worker run is under the probe limit...
    assert cost.inline(1)  # ...so it is tried inline, for RECENT runs
    cost.record(1, 400e-6, inline=True)  # one cold run (the loop had been idle) does not decide
    assert cost.inline(1)
    cost.record(1, 20e-6, inline=True)
    assert cost.inline(1) and not cost.inline(64)  # another bucket is still unknown
    cost.record(64, 30e-6, inline=True)
    assert cost.inline(100)  # the same power-of-two bucket as 64 (64..127)
    for _ in range(RECENT):  # the model turned slow (a throttled CPU): back to the worker
        cost.record(1, 500e-6, inline=True)
    assert not cost.inline(1)
    cost.record(1, 10e-6, inline=False)  # cheap in the worker again, but inline runs decide now...
    assert not cost.inline(1)
    for _ in range(REPROBE):  # ...until enough worker runs went by to try inline again
        cost.record(1, 10e-6, inline=False)
    assert cost.inline(1)
    cost.record(1, 20e-6, inline=True)  # warm now: back inline for good
    assert cost.inline(1)
    for _ in range(RECENT):  # slow again: back to the worker...
        cost.record(1, 500e-6, inline=True)
    for _ in range(REPROBE):
        cost.record(1, 10e-6, inline=False)
    assert cost.inline(1)  # ...tried again after REPROBE worker runs...
    for _ in range(RECENT):
        cost.record(1, 300e-6, inline=True)
    for _ in range(REPROBE):  # ...and that try failed: the next waits twice as long
        cost.record(1, 10e-6, inline=False)
    assert not cost.inline(1)
    for _ in range(REPROBE):
        cost.record(1, 10e-6, inline=False)
    assert cost.inline(1)
    assert cost.for_model("model-b").estimate(64) is None  # a switched model is measured afresh


def _batch1(config: EdgeConfig) -> EdgeConfig:
    """One input per model run, and one results message per batch (no coalescing over time): what
    the tests of commit timing look at."""
    return dataclasses.replace(_per_batch(config), model=dataclasses.replace(config.model, max_batch=1))


def _per_batch(config: EdgeConfig) -> EdgeConfig:
    return dataclasses.replace(config, uplink=dataclasses.replace(config.uplink, results_max_delay_s=0.0))


@contextlib.asynccontextmanager
async def _running_pipeline(
    config: EdgeConfig, classifier: Classifier, queue: Intake, *, sample_budget: int = 0
) -> AsyncIterator[Pipeline]:
    """A Pipeline over a real outbox at config.outbox.path, run on `queue` until the block ends."""
    outbox = await Outbox.open(config.outbox.path, 10**8)
    s = config.sampling
    sampler = UncertaintySampler(s.entropy_threshold, s.margin_threshold, sample_budget)
    window = Window(config.telemetry.max_features, time.time())
    pipeline = Pipeline(config, classifier, outbox, Escalations(8), sampler, lambda: window, lambda: False)
    task = asyncio.create_task(pipeline.run(queue))
    try:
        yield pipeline
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await outbox.close()


def _stored_answer_ids(outbox_path: Path) -> list[str]:
    """Answer ids in the outbox file, read with a second connection as a restarted node would:
    only committed rows are visible."""
    with contextlib.closing(sqlite3.connect(outbox_path)) as db:
        rows = db.execute("SELECT topic, payload FROM outbox WHERE topic LIKE '%/results'").fetchall()
    return sorted(
        a.inference_id for topic, payload in rows for a in Answered.of(decode_for_topic(Topics(), topic, payload))
    )


async def test_queue_join_means_every_answer_is_committed(
    demo_models: dict[str, DemoModel], digits: DigitsSplit, tmp_path: Path
) -> None:
    """The SIGTERM drain awaits `queue.join()`: with commits overlapping the next batches, an input
    must still count as done only once its result is in the file."""
    config = edge_config(tmp_path, 1, demo_models["edge"].path, routing={"escalate": False})
    queue = Intake(maxsize=4 * config.model.max_batch)
    classifier = Classifier.load(demo_models["edge"].path)
    answered: list[str] = []
    n = 1000
    budget = config.sampling.max_per_minute
    async with _running_pipeline(config, classifier, queue, sample_budget=budget) as pipeline:
        loop = asyncio.get_running_loop()
        for i in range(n):  # fast enough to fill the queue: micro-batches, several commits in flight
            x = digits.X_test[i % len(digits.X_test)].astype(np.float32)
            await queue.put(
                InputItem(f"in-{i}", x, loop.time(), on_done=lambda item, ok: answered.append(item.input_id))
            )
        await asyncio.wait_for(queue.join(), WAIT_S)
        assert _stored_answer_ids(config.outbox.path) == sorted(f"in-{i}" for i in range(n))
        assert len(answered) == n and pipeline.processed == n


async def test_batches_share_a_commit_under_load_and_a_lone_input_is_not_held_back(
    demo_models: dict[str, DemoModel], digits: DigitsSplit, tmp_path: Path
) -> None:
    """A burst at batch 1 is committed in groups of batches (one SQLite transaction and writer hop
    each), yet an input that arrives alone is committed without waiting for company."""
    config = _batch1(edge_config(tmp_path, 1, demo_models["edge"].path, routing={"escalate": False}))
    queue = Intake(maxsize=1000)
    loop = asyncio.get_running_loop()
    n = 500
    for i in range(n):  # queued before the pipeline starts: it never runs out of work until the end
        queue.put_nowait(InputItem(f"in-{i}", digits.X_test[i].astype(np.float32), loop.time()))
    async with _running_pipeline(config, Classifier.load(demo_models["edge"].path), queue) as pipeline:
        commits = 0
        put_many = pipeline.outbox.put_many

        async def counting_put_many(msgs: Iterable[OutMessage]) -> None:
            nonlocal commits
            commits += 1
            await put_many(msgs)

        # Installed before the pipeline task first runs (nothing awaited since it was created).
        pipeline.outbox.put_many = counting_put_many  # type: ignore[method-assign]  # counts, then commits
        await asyncio.wait_for(queue.join(), WAIT_S)
        assert pipeline.processed == n
        assert commits < n // 2, f"{commits} commits for {n} batches of one input"
        burst_commits = commits
        lone = asyncio.Event()
        queue.put_nowait(
            InputItem("lone", digits.X_test[0].astype(np.float32), loop.time(), on_done=lambda *_: lone.set())
        )
        await asyncio.wait_for(lone.wait(), WAIT_S)  # no later input comes to fill its group
        assert commits == burst_commits + 1
        assert _stored_answer_ids(config.outbox.path) == sorted([*(f"in-{i}" for i in range(n)), "lone"])


class _SlowClassifier(Classifier):
    """The demo model taking `delay_s` per run (a stand-in for a heavy model), recording when runs end."""

    delay_s = 0.3

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run_ends: list[float] = []

    def scores(self, batch: npt.NDArray[Any], rows_per_run: int | None = None) -> npt.NDArray[Any]:
        time.sleep(self.delay_s)  # the worker thread's run, not the event loop
        scores = super().scores(batch, rows_per_run)
        self.run_ends.append(time.monotonic())
        return scores


async def test_a_slow_models_next_run_does_not_hold_back_the_last_ones_results(
    demo_models: dict[str, DemoModel], digits: DigitsSplit, tmp_path: Path
) -> None:
    """A batch whose successor is already in inference waits at most COMMIT_GROUP_S for company,
    not for that whole (here 300 ms) run."""
    config = _batch1(edge_config(tmp_path, 1, demo_models["edge"].path, routing={"escalate": False}))
    classifier = _SlowClassifier.load(demo_models["edge"].path)
    queue = Intake(maxsize=8)
    loop = asyncio.get_running_loop()
    done_at: dict[str, float] = {}

    def record(item: InputItem, ok: bool) -> None:
        done_at[item.input_id] = time.monotonic()

    for name in ("first", "second"):  # two batches of one: the second is in inference when the first ends
        queue.put_nowait(InputItem(name, digits.X_test[0].astype(np.float32), loop.time(), on_done=record))
    async with _running_pipeline(config, classifier, queue):
        await asyncio.wait_for(queue.join(), WAIT_S)
        first_run_end, second_run_end = classifier.run_ends[-2:]
        assert done_at["first"] < second_run_end, "the first input's commit waited for the second run"
        assert done_at["first"] - first_run_end < _SlowClassifier.delay_s / 2


async def test_a_directory_backlog_is_read_no_faster_than_the_intake_takes_it(tmp_path: Path) -> None:
    """After downtime the inbox may hold many files: they are read as the intake has room, not all
    into memory (and with the loop blocked) at once."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(50):
        np.save(inbox / f"x-{i:02d}.npy", np.full(64, i, np.float32))
    queue = Intake(maxsize=4)
    source = DirectorySource(queue, InputIds(), inbox, poll_s=0.05)
    task = asyncio.create_task(source.run())
    try:
        await wait_for_async(queue.full, WAIT_S, "the intake filled by the source")
        read = len(source._seen)  # files read so far (the source's own record of them)
        assert read <= queue.maxsize + 1, f"{read} files read for an intake of {queue.maxsize}"
        taken = queue.get_batch_nowait(100)
        while len(taken) < 50:  # the rest follow as the intake empties, in order
            await queue.nonempty()
            taken += queue.get_batch_nowait(100)
        assert [item.source_ref for item in taken] == [f"file:x-{i:02d}.npy" for i in range(50)]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class _RunSpy:
    """The classifier's real ORT session, recording how many rows each `run` was given."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.rows: list[int] = []

    def run(self, output_names: Any, feed: dict[str, npt.NDArray[Any]], *args: Any) -> Any:
        self.rows.append(len(next(iter(feed.values()))))
        return self._session.run(output_names, feed, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def _spied(classifier: Classifier) -> _RunSpy:
    spy = _RunSpy(classifier.session)
    classifier.session = spy  # a recording proxy of the real session
    return spy


def _results_messages(outbox_path: Path) -> int:
    with contextlib.closing(sqlite3.connect(outbox_path)) as db:
        (count,) = db.execute("SELECT count(*) FROM outbox WHERE topic LIKE '%/results'").fetchone()
    return int(count)


def _fixed_batch_copy(model: Path, out: Path) -> Path:
    """The model with its batch dimension fixed to 1, as many exported models come."""
    proto = onnx.load(model)
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(proto, out)
    return out


async def _answer_backlog(
    config: EdgeConfig, classifier: Classifier, xs: npt.NDArray[np.float32], *, intake_bound: int | None = None
) -> list[str]:
    """Queue every input before the pipeline starts (a backlog), run until all are committed, and
    return the answers' labels in input order. `intake_bound`: what the pipeline must have sized
    the intake to by the end."""
    queue = Intake(maxsize=len(xs))
    loop = asyncio.get_running_loop()
    for i, x in enumerate(xs):
        queue.put_nowait(InputItem(f"in-{i:04d}", x, loop.time()))
    async with _running_pipeline(config, classifier, queue):
        await asyncio.wait_for(queue.join(), WAIT_S)
    if intake_bound is not None:
        assert queue.maxsize == intake_bound
    with contextlib.closing(sqlite3.connect(config.outbox.path)) as db:
        rows = db.execute("SELECT topic, payload FROM outbox WHERE topic LIKE '%/results'").fetchall()
    answers = [a for topic, payload in rows for a in Answered.of(decode_for_topic(Topics(), topic, payload))]
    assert sorted(a.inference_id for a in answers) == [f"in-{i:04d}" for i in range(len(xs))]
    return [a.label for a in sorted(answers, key=lambda a: a.inference_id)]


async def test_a_one_input_model_runs_a_backlog_in_serial_jobs(
    demo_models: dict[str, DemoModel], digits: DigitsSplit, tmp_path: Path
) -> None:
    """max_batch = 1: every model run takes exactly one input, yet a backlog goes to the model (and
    through routing, results and commit) several inputs per job, with every answer right."""
    config = _batch1(edge_config(tmp_path, 1, demo_models["edge"].path, routing={"escalate": False}))
    classifier = Classifier.load(demo_models["edge"].path)
    expected = [classifier.info.labels[k] for k in classifier.predict(digits.X_test[:300]).argmax(axis=1)]
    spy = _spied(classifier)
    # The demo model runs in microseconds: jobs of MAX_SERIAL_ROWS, and room for INTAKE_BATCHES of them.
    intake_bound = INTAKE_BATCHES * MAX_SERIAL_ROWS
    labels = await _answer_backlog(
        config, classifier, digits.X_test[:300].astype(np.float32), intake_bound=intake_bound
    )
    assert labels == expected
    assert set(spy.rows) == {1} and len(spy.rows) == 300
    messages = _results_messages(config.outbox.path)
    assert messages < 300 // 4, f"{messages} results messages for 300 inputs: jobs of one input"


async def test_a_fixed_batch_model_runs_a_backlog_one_input_per_run_in_serial_jobs(
    demo_models: dict[str, DemoModel], digits: DigitsSplit, tmp_path: Path
) -> None:
    """A model exported with batch dimension 1 is never handed more, whatever max_batch says."""
    model = _fixed_batch_copy(demo_models["edge"].path, tmp_path / "fixed.onnx")
    config = edge_config(tmp_path, 1, model, routing={"escalate": False})  # max_batch 256
    classifier = Classifier.load(model)
    assert not classifier.info.dynamic_batch
    expected = [classifier.info.labels[k] for k in classifier.predict(digits.X_test[:200]).argmax(axis=1)]
    spy = _spied(classifier)
    assert await _answer_backlog(config, classifier, digits.X_test[:200].astype(np.float32)) == expected
    assert set(spy.rows) == {1} and len(spy.rows) == 200
    assert _results_messages(config.outbox.path) < 200 // 4


async def test_a_model_slower_than_a_serial_job_answers_each_input_on_its_own(
    demo_models: dict[str, DemoModel], digits: DigitsSplit, tmp_path: Path
) -> None:
    """Serial jobs are sized by the measured run cost: a run longer than SERIAL_JOB_S is a job of
    its own, so no answer waits for another input's run."""

    class Slow(_SlowClassifier):
        delay_s = 2 * SERIAL_JOB_S

    config = _batch1(edge_config(tmp_path, 1, demo_models["edge"].path, routing={"escalate": False}))
    classifier = Slow.load(demo_models["edge"].path)
    # The intake still holds a burst of small inputs (INTAKE_MIN_INPUTS), however slow the model.
    bound = max(INTAKE_BATCHES, INTAKE_MIN_INPUTS)
    await _answer_backlog(config, classifier, digits.X_test[:20].astype(np.float32), intake_bound=bound)
    assert _results_messages(config.outbox.path) == 20


def _camera_model(path: Path, side: int = 224) -> Path:
    """A classifier of 3 x side x side float32 frames (600 KB each at 224): global average pool,
    then a 3 -> 10 linear layer; logits out."""
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.standard_normal((3, 10)).astype(np.float32), "W")
    bias = numpy_helper.from_array(np.zeros(10, np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["frame"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "W", "b"], ["logits"]),
        ],
        "camera",
        [helper.make_tensor_value_info("frame", TensorProto.FLOAT, ["batch", 3, side, side])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"output_kind": "logits", "model_name": "camera", "model_version": "1"})
    onnx.save(model, path)
    return path


async def test_large_inputs_are_batched_and_queued_within_intake_max_bytes(tmp_path: Path) -> None:
    """Four batches of 256 camera frames would be 600 MB: a batch takes at most a quarter of
    INTAKE_MAX_BYTES and the intake holds at most INTAKE_MAX_BYTES, yet every input of a backlog
    larger than that is answered."""
    model = _camera_model(tmp_path / "camera.onnx")
    classifier = Classifier.load(model)
    frame_bytes = classifier.info.input_bytes
    assert frame_bytes == 3 * 224 * 224 * 4
    config = edge_config(tmp_path, 1, model, routing={"escalate": False})  # max_batch 256
    frames = np.random.default_rng(1).random((150, 3, 224, 224), dtype=np.float32)
    batch_limit = INTAKE_MAX_BYTES // (INTAKE_BATCHES * frame_bytes)  # 27
    assert batch_limit < config.model.max_batch and INTAKE_BATCHES * batch_limit < len(frames)
    expected = [classifier.info.labels[k] for k in classifier.predict(frames).argmax(axis=1)]
    spy = _spied(classifier)
    labels = await _answer_backlog(config, classifier, frames, intake_bound=INTAKE_BATCHES * batch_limit)
    assert labels == expected
    assert max(spy.rows) == batch_limit and sum(spy.rows) == len(frames)


async def test_batches_of_an_expensive_model_are_kept_to_batch_job_s(
    demo_models: dict[str, DemoModel], digits: DigitsSplit, tmp_path: Path
) -> None:
    """max_batch is an upper bound: a model costing 4 ms per input batches ~BATCH_JOB_S worth of
    them (4-5 of 40 waiting), starting from a batch of one, so no input waits long for batch-mates."""

    class PerInput(Classifier):
        row_s = 0.004

        def scores(self, batch: npt.NDArray[Any], rows_per_run: int | None = None) -> npt.NDArray[Any]:
            time.sleep(self.row_s * len(batch))  # in the worker thread
            return super().scores(batch, rows_per_run)

    config = edge_config(tmp_path, 1, demo_models["edge"].path, routing={"escalate": False})  # max_batch 256
    classifier = PerInput.load(demo_models["edge"].path)
    spy = _spied(classifier)
    await _answer_backlog(config, classifier, digits.X_test[:40].astype(np.float32))
    rows_per_batch = int(BATCH_JOB_S / PerInput.row_s)  # at most: a run costs a bit more than its sleep
    assert spy.rows[0] == 1 and rows_per_batch - 1 <= max(spy.rows) <= rows_per_batch, spy.rows
    assert sum(spy.rows) == 40


def _answers_per_message(outbox_path: Path) -> list[list[str]]:
    """The answers of each results message in the outbox file, in commit order."""
    with contextlib.closing(sqlite3.connect(outbox_path)) as db:
        rows = db.execute("SELECT topic, payload FROM outbox WHERE topic LIKE '%/results' ORDER BY id").fetchall()
    return [[a.inference_id for a in Answered.of(decode_for_topic(Topics(), t, p))] for t, p in rows]


async def test_answers_share_a_message_until_it_is_full_or_old_and_finish_when_it_is_committed(
    demo_models: dict[str, DemoModel], digits: DigitsSplit, tmp_path: Path
) -> None:
    """[uplink] results_max_answers / results_max_delay_s: at a trickle of inputs, a results message
    per micro-batch would cost more framing than answers; they wait and go together instead."""
    config = edge_config(
        tmp_path,
        1,
        demo_models["edge"].path,
        routing={"escalate": False},
        uplink={"results_max_answers": 40, "results_max_delay_s": 0.4},
    )
    queue = Intake(maxsize=64)
    loop = asyncio.get_running_loop()
    finished: dict[str, float] = {}
    async with _running_pipeline(config, Classifier.load(demo_models["edge"].path), queue):
        sent_at = loop.time()
        for i in range(100):  # a trickle: micro-batches of about one input
            x = digits.X_test[i].astype(np.float32)
            await queue.put(
                InputItem(
                    f"in-{i}", x, loop.time(), on_done=lambda it, ok: finished.setdefault(it.input_id, loop.time())
                )
            )
            await asyncio.sleep(0.002)
        await asyncio.wait_for(queue.join(), WAIT_S)
        joined_at = loop.time()
    messages = _answers_per_message(config.outbox.path)
    # The node's first answers at once (a micro-batch), then two full messages, then the rest when
    # the first of them had waited 0.4 s: all 100, in order.
    first = len(messages[0])
    assert first < 10 and [len(m) for m in messages[1:]] == [40, 40, 20 - first]
    assert [i for m in messages for i in m] == [f"in-{i}" for i in range(100)]
    # The last ones finished only with their message (after the delay), and join waited for it.
    assert min(finished[f"in-{i}"] for i in range(100 - len(messages[-1]), 100)) >= sent_at + 0.4
    assert joined_at >= max(finished.values())


async def test_a_switched_model_sends_the_old_models_waiting_answers_first(
    demo_models: dict[str, DemoModel], digits: DigitsSplit, tmp_path: Path
) -> None:
    config = edge_config(
        tmp_path, 1, demo_models["edge"].path, routing={"escalate": False}, uplink={"results_max_delay_s": 5.0}
    )
    queue = Intake(maxsize=64)
    loop = asyncio.get_running_loop()
    async with _running_pipeline(config, Classifier.load(demo_models["edge"].path), queue) as pipeline:
        for i in range(3):
            await queue.put(InputItem(f"old-{i}", digits.X_test[i].astype(np.float32), loop.time()))
        await wait_for_async(lambda: pipeline.processed, 10, "3 inputs answered", until=lambda n: n >= 3)
        pipeline.switch_model(Classifier.load(demo_models["cloud"].path))
        for i in range(2):
            await queue.put(InputItem(f"new-{i}", digits.X_test[i].astype(np.float32), loop.time()))
        await wait_for_async(lambda: pipeline.processed, 10, "2 more", until=lambda n: n >= 5)
        await pipeline.flush_results()  # what the SIGTERM drain does
        await asyncio.wait_for(queue.join(), WAIT_S)
    messages = _answers_per_message(config.outbox.path)
    # The first answers left at once; the old model's others before the new model's, none mixed.
    assert [i for m in messages for i in m] == ["old-0", "old-1", "old-2", "new-0", "new-1"]
    assert messages[-1] == ["new-0", "new-1"] and len(messages) <= 3
