"""The shadow stage's parts: `--stages shadow:PCT`, its verdict on synthetic numbers, and the device's
ShadowRunner on the real demo models in its real thread (sampling, comparisons, dropping when busy).
tests/test_rollout_shadow_e2e.py runs the whole stage with real nodes and a real bridge."""

from __future__ import annotations

import threading
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import pytest

from cloud_bridge.errors import UsageError
from cloud_bridge.rollout.policy import GroupStats, Thresholds, parse_thresholds, thresholds_for
from cloud_bridge.rollout.shadow_policy import ShadowGroup, aggregate_shadow, judge_shadow
from cloud_bridge.rollout.stages import parse_stages, stages_text
from cloud_bridge.tsdb import telemetry_lines
from demokit.dataset import DigitsSplit
from demokit.models import DemoModel
from edge_node.inference.model import Classifier
from edge_node.inference.shadow import QUEUE_BATCHES, ShadowRunner
from edge_node.input.intake import InputItem
from schemas import ModelRef, ShadowStats, Telemetry, to_builtins
from tests.factories import examples


def test_stages_take_one_leading_shadow_stage() -> None:
    assert parse_stages("shadow:100,25,100") == (-100, 25, 100)
    assert parse_stages("shadow:50,100") == (-50, 100)
    assert stages_text((-100, 25, 100)) == "shadow:100,25,100"
    for bad in ("25,shadow:100", "shadow:0", "shadow:100,shadow:50", "shadow:x,100", "shadow", "shadow:100"):
        with pytest.raises(UsageError, match="--stages"):
            parse_stages(bad)


def test_shadow_thresholds_are_the_rollout_thresholds() -> None:
    overrides = parse_thresholds(["min_shadow_inputs=50,shadow:min_shadow_agreement=0.9,25:min_inferences=7"])
    shadow = thresholds_for(Thresholds(), overrides, -100)
    assert (shadow.min_shadow_inputs, shadow.min_shadow_agreement, shadow.min_inferences) == (50, 0.9, 200)
    assert thresholds_for(Thresholds(), overrides, 25).min_shadow_agreement == Thresholds().min_shadow_agreement


T = Thresholds(min_shadow_inputs=100, min_answered=10)
ACTIVE = GroupStats(inferences=1000, confidence_mean=0.9, latency_p95_ms=2.0)
GOOD = ShadowGroup(inputs=200, agreed=190, labeled=50, correct=48, active_correct=47, confidence_mean=0.9)


def test_judge_waits_for_inputs_then_passes_a_window_within_limits() -> None:
    few = ShadowGroup(inputs=99, agreed=99)
    assert judge_shadow(few, ACTIVE, T, window_elapsed=False).verdict == "wait"
    assert judge_shadow(few, ACTIVE, T, window_elapsed=True).verdict == "hold"
    assert judge_shadow(GOOD, ACTIVE, T, window_elapsed=False).verdict == "wait"
    passed = judge_shadow(GOOD, ACTIVE, T, window_elapsed=True)
    assert passed.verdict == "promote" and "agreement_with_active" in passed.reason


@pytest.mark.parametrize(
    ("change", "metric"),
    [
        ({"agreed": 60}, "agreement_with_active"),
        ({"correct": 40}, "accuracy"),
        ({"errors": 1}, "shadow_errors"),
        ({"cloud_answered": 20, "cloud_agreed": 5, "active_cloud_agreed": 15}, "cloud_agreement"),
        ({"confidence_mean": 0.5}, "confidence_mean"),
        ({"latency_p95_ms": 50.0}, "latency_p95_ms"),
    ],
)
def test_judge_fails_a_shadow_that_crosses_a_threshold_at_once(change: dict[str, Any], metric: str) -> None:
    shadow = ShadowGroup(**{**GOOD.__dict__, **change})
    decision = judge_shadow(shadow, ACTIVE, T, window_elapsed=False)
    assert decision.verdict == "rollback" and decision.reason.startswith(f"shadow {metric}:"), decision.reason


def _items(digits: DigitsSplit, n: int, start: int = 0) -> tuple[list[InputItem], npt.NDArray[np.float32]]:
    idx = [(start + i) % len(digits.X_test) for i in range(n)]
    x = np.stack([digits.X_test[i] for i in idx]).astype(np.float32)
    labels = digits.labels
    items = [InputItem(f"in-{start + k}", x[k], 0.0, truth=labels[int(digits.y_test[i])]) for k, i in enumerate(idx)]
    return items, x


def _active_top1(active: Classifier, x: npt.NDArray[np.float32]) -> npt.NDArray[np.intp]:
    return active.predict(x).argmax(axis=1)


def _unsure(n: int) -> npt.NDArray[np.bool_]:
    """`confident` for a batch none of whose answers is final at the edge (each may be escalated)."""
    return np.zeros(n, dtype=np.bool_)


def test_runner_compares_the_shadow_with_the_active_model_the_labels_and_the_cloud(
    demo_models: dict[str, DemoModel], digits: DigitsSplit
) -> None:
    active = Classifier.load(demo_models["edge"].path)
    candidate = Classifier.load(demo_models["cloud"].path)
    runner = ShadowRunner(share=0.5, seed=1, min_rows=1)  # every offer a job of its own
    items, x = _items(digits, 64)
    runner.offer(items, x, _active_top1(active, x), _unsure(len(x)), active.info.labels)  # nothing shadowed yet
    runner.start(candidate)
    try:
        for start in range(0, 320, 64):
            items, x = _items(digits, 64, start)
            runner.offer(items, x, _active_top1(active, x), _unsure(len(x)), active.info.labels)
            runner.drain()  # one batch at a time: none is dropped
        answered = [item.input_id for item in items]
        for input_id in answered:
            runner.cloud_answer(input_id, "0", active_agreed=True)
        stats = runner.take()
    finally:
        runner.close()
    assert stats is not None and stats.model == candidate.info.ref
    assert 100 < stats.inputs < 220 and stats.skipped == 0 and stats.errors == 0  # about half of 320
    assert stats.labeled == stats.inputs  # every replayed input has its label
    assert stats.agreed / stats.inputs > 0.8 and stats.correct / stats.labeled > 0.85
    assert 0 < stats.cloud_answered < 64 and stats.active_cloud_agreed == stats.cloud_answered
    assert stats.confidence_mean is not None and stats.latency_p95_ms is not None
    # The bridge reads the field back from the telemetry body.
    group = aggregate_shadow([{"device_id": "d", "shadow": to_builtins(stats)}], candidate.info.ref.sha256)
    assert (group.inputs, group.agreed, group.correct) == (stats.inputs, stats.agreed, stats.correct)
    assert runner.take() is None  # stopped


class _Gated(Classifier):
    """The real classifier, held at the door of each run until the test opens it."""

    def __init__(self, real: Classifier) -> None:
        super().__init__(real.session, real.info, real.providers)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def predict(self, batch: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        self.entered.set()
        assert self.gate.wait(30)
        return super().predict(batch)


def test_a_busy_runner_drops_and_counts_instead_of_waiting(
    demo_models: dict[str, DemoModel], digits: DigitsSplit
) -> None:
    active = Classifier.load(demo_models["edge"].path)
    gated = _Gated(Classifier.load(demo_models["cloud"].path))
    runner = ShadowRunner(share=1.0, min_rows=1)
    runner.start(gated)
    try:
        items, x = _items(digits, 8)
        top1 = _active_top1(active, x)
        runner.offer(items, x, top1, _unsure(len(x)), active.info.labels)
        assert gated.entered.wait(30)  # the thread holds the first batch
        for _ in range(QUEUE_BATCHES):
            runner.offer(items, x, top1, _unsure(len(x)), active.info.labels)  # queued
        runner.offer(items, x, top1, _unsure(len(x)), active.info.labels)  # no room: dropped at once
        gated.gate.set()
        runner.drain()
        stats = runner.take()
    finally:
        gated.gate.set()
        runner.close()
    assert stats is not None
    assert (stats.inputs, stats.skipped) == (8 * (1 + QUEUE_BATCHES), 8)


def test_the_shadow_counts_are_a_tsdb_point_of_their_own() -> None:
    telemetry = next(m for m in examples() if isinstance(m, Telemetry))
    candidate = ModelRef(name="digits-edge", version="1.1.0", sha256="a" * 64)
    stats = ShadowStats(model=candidate, inputs=40, skipped=3, agreed=38, labeled=10, correct=9, active_correct=8)
    lines = telemetry_lines(msgspec.structs.replace(telemetry, shadow=stats))
    ts = str(round(telemetry.window_end * 1000))
    assert lines[-1].startswith("shadow,active=1.0.0,device=dev-1,fleet=f1,model=digits-edge,version=1.1.0 inputs=40i,")
    assert "skipped=3i" in lines[-1] and "active_correct=8i" in lines[-1] and lines[-1].endswith(" " + ts)
    assert "confidence_mean" not in lines[-1]


def test_small_offers_are_gathered_into_one_job(demo_models: dict[str, DemoModel], digits: DigitsSplit) -> None:
    active = Classifier.load(demo_models["edge"].path)
    runner = ShadowRunner(share=1.0, min_rows=64, flush_s=3600)
    runner.start(Classifier.load(demo_models["cloud"].path))
    try:
        for start in range(0, 48, 16):
            items, x = _items(digits, 16, start)
            runner.offer(items, x, _active_top1(active, x), _unsure(16), active.info.labels)
        runner.drain()
        gathering = runner.take()
        items, x = _items(digits, 16, 48)
        runner.offer(items, x, _active_top1(active, x), _unsure(16), active.info.labels)  # 64 rows: one job
        runner.drain()
        for item in _items(digits, 64)[0]:
            runner.cloud_answer(item.input_id, "0", active_agreed=False)
        stats = runner.take()
    finally:
        runner.close()
    assert gathering is not None and gathering.inputs == 0
    assert stats is not None and (stats.inputs, stats.labeled, stats.cloud_answered) == (64, 64, 64)
    assert stats.agreed > 48 and stats.active_cloud_agreed == 0
