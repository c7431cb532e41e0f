"""The edge node end to end: a real broker, real ONNX models, real SQLite outbox."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pytest

from common.numeric import softmax
from demokit.dataset import DigitsSplit
from demokit.models import DemoModel
from devservers import Mosquitto
from edge_node.inference.model import Classifier
from edge_node.routing.confidence import decide, decide_logits, decide_scores
from edge_node.telemetry import FOLD_ROWS, Window, pool_features
from schemas import Input, Results, Sample, Status, Telemetry, Topics, encode, encode_tensor, new_msg_id
from tests.config_files import write_edge_config
from tests.edge_harness import CloudResponder, RunningNode, edge_config, wait_connected
from tests.mqtt_collector import Answered, Collector
from tests.poll import wait_for_async
from tests.processes import run_edge_node, stop

TOPICS = Topics()
INPUT_TOPIC = "fleet/f1/dev-1/input"


def _input(x: np.ndarray, input_id: str, truth: str | None = None) -> bytes:
    return encode(
        Input(
            msg_id=new_msg_id(),
            fleet_id="f1",
            device_id="dev-1",
            ts=time.time(),
            input_id=input_id,
            tensor=encode_tensor(x),
            truth=truth,
        )
    )


def _results(c: Collector) -> list[Answered]:
    """Every answer the node published; it runs current software, so each message is a result/2."""
    messages = [r.message() for r in c.on("results")]
    assert all(isinstance(m, Results) for m in messages), {type(m).__name__ for m in messages}
    return c.answers()


def _answered(at_least: int) -> Callable[[Collector], bool]:
    """A wait_for predicate: `at_least` answers received (a results message carries a micro-batch)."""
    return lambda c: len(c.answers()) >= at_least


def _telemetry(c: Collector) -> list[Telemetry]:
    return [m for m in (r.message() for r in c.on("telemetry")) if isinstance(m, Telemetry)]


def _expected_confident(model: DemoModel, X: np.ndarray, threshold: float) -> np.ndarray:
    probs = Classifier.load(model.path).predict(X.astype(np.float32))
    return decide(probs, threshold).confident


def test_decide_measures_each_row_and_keeps_probabilities_in_range() -> None:
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # confident
            [0.4, 0.35, 0.25],  # unsure, small margin
            [1.0000001, 0.0, 0.0],  # a "probabilities" model overshooting by a rounding error
        ],
        np.float32,
    )
    d = decide(probs, 0.6)
    assert d.top1.tolist() == [0, 0, 0]
    assert d.confident.tolist() == [True, False, True]
    assert d.confidence.dtype == d.margin.dtype == d.entropy.dtype == np.float32
    assert d.confidence.tolist() == pytest.approx([0.7, 0.4, 1.0])
    assert d.margin.tolist() == pytest.approx([0.5, 0.05, 1.0])
    assert 0 <= d.confidence.max() <= 1 and 0 <= d.margin.max() <= 1
    expected = [-sum(p * np.log(p) for p in row if p > 0) for row in probs.astype(np.float64)]
    assert d.entropy.tolist() == pytest.approx([max(e, 0.0) for e in expected], abs=1e-5)


def test_decide_on_logits_gives_what_decide_gives_on_their_softmax() -> None:
    """The hot path's fused softmax + measures against the plain two steps, on batches with huge
    logits (exp underflows to 0 for all but one class), ties, and a one-class model."""
    rng = np.random.default_rng(7)
    cases = [
        (rng.standard_normal((64, 10)) * 3).astype(np.float32),
        (rng.standard_normal((8, 10)) * 1e4).astype(np.float32),
        np.array([[2.0, 2.0, -1.0], [0.0, 0.0, 0.0], [5.0, 1.0, 5.0]], np.float32),
        rng.standard_normal((5, 1)).astype(np.float32),
    ]
    for logits in cases:
        fused, plain = decide_logits(logits, 0.6), decide(softmax(logits), 0.6)
        np.testing.assert_allclose(fused.probs, plain.probs, atol=1e-6)
        np.testing.assert_array_equal(fused.top1, plain.top1)
        np.testing.assert_array_equal(fused.confidence, plain.confidence)  # the same 1 / s, bit for bit
        np.testing.assert_allclose(fused.margin, plain.margin, atol=1e-6)
        np.testing.assert_allclose(fused.entropy, plain.entropy, atol=1e-5)
        np.testing.assert_array_equal(fused.confident, plain.confident)
        assert fused.entropy.min() >= 0 and fused.margin.min() >= 0 and fused.confidence.max() <= 1
    # A model's output shaped [N, C, 1, 1] is routed on its [N, C].
    logits = cases[0]
    shaped = decide_scores(logits.reshape(64, 10, 1, 1), "logits", 0.6)
    np.testing.assert_array_equal(shaped.confidence, decide_logits(logits, 0.6).confidence)
    probs = softmax(logits)
    np.testing.assert_array_equal(decide_scores(probs, "probabilities", 0.6).confidence, decide(probs, 0.6).confidence)


def test_window_feature_statistics_over_many_batches_and_a_model_with_other_inputs() -> None:
    """Per-feature mean/std of every input of the window, whether or not its batches were folded
    into the sums yet (FOLD_ROWS), pooled when wider than max_features; a model switched in with
    inputs of another shape restarts them."""
    rng = np.random.default_rng(3)
    window = Window(max_features=64, started=0.0)
    batches = [rng.normal(i, 1 + i, size=(int(rng.integers(1, 200)), 64)).astype(np.float32) for i in range(20)]
    ones = np.ones(1, np.float32)
    for batch in batches:
        window.add_batch(batch, ones, ones)
    every = np.concatenate(batches).astype(np.float64)
    assert len(every) > FOLD_ROWS  # some folded, some still waiting
    stats = window.features()
    assert stats is not None and stats.n == len(every) and stats.dims == 64
    np.testing.assert_allclose(stats.mean, every.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.std, every.std(axis=0), rtol=1e-4, atol=1e-4)
    frames = rng.random((10, 3, 16, 16), dtype=np.float32)  # 768 values: pooled to 64
    window.add_batch(frames, ones, ones)
    stats = window.features()
    assert stats is not None and stats.n == 10 and stats.dims == 768
    np.testing.assert_allclose(stats.mean, pool_features(frames, 64).mean(axis=0), rtol=1e-5)


@pytest.mark.parametrize("threshold", [0.7, 0.95])
async def test_routing_follows_the_model_probabilities(
    mosquitto: Mosquitto, demo_models: dict[str, DemoModel], digits: DigitsSplit, tmp_path: Path, threshold: float
) -> None:
    X = digits.X_test[:120]
    confident = _expected_confident(demo_models["edge"], X, threshold)
    config = edge_config(
        tmp_path,
        mosquitto.port,
        demo_models["edge"].path,
        routing={"confidence_threshold": threshold, "escalation_timeout_s": 0.3},
    )
    with Collector(mosquitto.host, mosquitto.port, ["fleet/f1/dev-1/#"]) as c:
        async with RunningNode(config) as node:
            await wait_connected(node)
            await asyncio.to_thread(c.publish_many, INPUT_TOPIC, [_input(x, f"in-{i}") for i, x in enumerate(X)])
            await asyncio.to_thread(c.wait_for, _answered(len(X)))
        results = {r.inference_id: r for r in _results(c)}
    assert len(results) == len(X)
    for i in range(len(X)):
        r = results[f"in-{i}"]
        if confident[i]:
            assert r.path == "edge" and r.confidence >= threshold
        else:
            # Nobody answers escalations here: the local answer is final after the timeout.
            assert (r.path, r.fallback_reason) == ("edge_fallback", "timeout")
            assert r.latency_ms >= 300 * 0.9
    assert sum(1 for r in results.values() if r.path == "edge") == int(confident.sum())


async def test_escalations_answered_by_the_cloud_model_improve_accuracy(
    mosquitto: Mosquitto, demo_models: dict[str, DemoModel], digits: DigitsSplit, tmp_path: Path
) -> None:
    X, y = digits.X_test[:300], digits.y_test[:300]
    config = edge_config(
        tmp_path,
        mosquitto.port,
        demo_models["edge"].path,
        routing={"confidence_threshold": 0.9, "escalation_timeout_s": 5.0, "max_outstanding": 512},
    )
    with (
        CloudResponder(mosquitto.host, mosquitto.port, demo_models["cloud"].path) as cloud,
        Collector(mosquitto.host, mosquitto.port, ["fleet/f1/dev-1/#"]) as c,
    ):
        async with RunningNode(config) as node:
            await wait_connected(node)
            inputs = [_input(x, f"in-{i}", digits.labels[int(y[i])]) for i, x in enumerate(X)]
            await asyncio.to_thread(c.publish_many, INPUT_TOPIC, inputs)
            await asyncio.to_thread(c.wait_for, _answered(len(X)))
        await asyncio.to_thread(c.wait_for, lambda c: len(c.on("telemetry")) >= 1)
        results = _results(c)
        telemetry = _telemetry(c)
    escalated = [r for r in results if r.path == "cloud"]
    assert escalated, "some inputs must be unsure at threshold 0.9"
    assert cloud.answered == len(escalated)
    assert all(r.cloud_label == r.label and r.fallback_reason is None for r in escalated)
    edge_right = sum(r.edge_label == r.truth for r in results)
    final_right = sum(r.label == r.truth for r in results)
    assert final_right > edge_right
    tele = telemetry[-1]
    assert tele.count == len(X)
    assert tele.escalations.sent == tele.escalations.answered == len(escalated)
    # The device's own speed leaves the cloud round trips out: the slowest edge answer is faster
    # than the slowest answer overall, which came back from the cloud.
    assert tele.edge_latency_ms is not None and tele.latency_ms is not None
    slowest_cloud = max(r.latency_ms for r in escalated)
    assert tele.latency_ms.max == pytest.approx(max(slowest_cloud, tele.edge_latency_ms.max), abs=1e-3)
    assert tele.edge_latency_ms.max == pytest.approx(max(r.latency_ms for r in results if r.path == "edge"), abs=1e-3)
    assert tele.escalations.agreed == sum(r.edge_label == r.cloud_label for r in escalated)
    fallbacks = [(r.inference_id, r.fallback_reason) for r in results if r.path == "edge_fallback"]
    assert tele.paths == {"edge": len(X) - len(escalated), "cloud": len(escalated)}, (
        fallbacks,
        mosquitto.log_text()[-2000:],
    )


async def test_a_reply_saying_the_cloud_does_not_help_pauses_escalations(
    mosquitto: Mosquitto, demo_models: dict[str, DemoModel], digits: DigitsSplit, tmp_path: Path
) -> None:
    """A reply with pause_s (the bridge found on labeled samples that its model is no better than
    this device's): the node stops asking for that long; unsure inputs keep their local answer."""
    X, y = digits.X_test[:300], digits.y_test[:300]
    config = edge_config(
        tmp_path,
        mosquitto.port,
        demo_models["edge"].path,
        routing={"confidence_threshold": 0.9, "escalation_timeout_s": 5.0, "max_outstanding": 1},
    )
    with (
        CloudResponder(mosquitto.host, mosquitto.port, demo_models["cloud"].path, pause_s=600.0) as cloud,
        Collector(mosquitto.host, mosquitto.port, ["fleet/f1/dev-1/#"]) as c,
    ):
        async with RunningNode(config) as node:
            await wait_connected(node)
            inputs = [_input(x, f"in-{i}", digits.labels[int(y[i])]) for i, x in enumerate(X)]
            # One at a time, each answered before the next, until the cloud has replied once.
            n = 0
            while not c.on("escalate/reply"):
                await asyncio.to_thread(c.publish_many, INPUT_TOPIC, [inputs[n]])
                n += 1
                await asyncio.to_thread(c.wait_for, _answered(n))
            await asyncio.to_thread(c.publish_many, INPUT_TOPIC, inputs[n:])
            await asyncio.to_thread(c.wait_for, _answered(len(X)))
        await asyncio.to_thread(c.wait_for, lambda c: len(c.on("telemetry")) >= 1)
        results = _results(c)
        tele = _telemetry(c)[-1]
    paused = [r for r in results if r.fallback_reason == "budget"]
    assert cloud.answered == tele.escalations.sent == 1
    assert paused and tele.escalations.paused == len(paused)
    assert all(r.path == "edge_fallback" and r.label == r.edge_label for r in paused)


async def test_bad_inputs_are_rejected_and_counted_while_good_ones_go_through(
    mosquitto: Mosquitto, demo_models: dict[str, DemoModel], digits: DigitsSplit, tmp_path: Path
) -> None:
    config = edge_config(tmp_path, mosquitto.port, demo_models["edge"].path, routing={"escalate": False})
    good = digits.X_test[:10]
    nan = good[0].copy()
    nan[3] = np.nan
    wrong_shape = np.zeros(63, np.float32)
    bad_tensor = orjson.loads(_input(good[0], "x"))
    bad_tensor["tensor"]["data"] = base64.b64encode(b"short").decode()
    payloads = [
        _input(good[0], "g0"),
        _input(nan, "nan"),
        _input(good[1], "g1"),
        _input(wrong_shape, "shape"),
        b"{not json",
        _input(good[2], "g2"),
        orjson.dumps(bad_tensor),
        _input(np.ones(64, bool), "bool"),
        _input(good[3], "g3"),
    ]
    with Collector(mosquitto.host, mosquitto.port, ["fleet/f1/dev-1/#"]) as c:
        async with RunningNode(config) as node:
            await wait_connected(node)
            await asyncio.to_thread(c.publish_many, INPUT_TOPIC, payloads)
            await asyncio.to_thread(c.wait_for, _answered(4))
        await asyncio.to_thread(c.wait_for, lambda c: len(c.on("telemetry")) >= 1)
        results = _results(c)
        (tele,) = _telemetry(c)
    assert sorted(r.inference_id for r in results) == ["g0", "g1", "g2", "g3"]
    assert tele.count == 4
    assert tele.rejected == 5
    assert tele.rejected_reasons == {"nonfinite": 1, "shape": 1, "undecodable": 2, "dtype": 1}


async def test_sampling_respects_the_budget_and_counts_what_it_skips(
    mosquitto: Mosquitto, demo_models: dict[str, DemoModel], digits: DigitsSplit, tmp_path: Path
) -> None:
    X = digits.X_test[:300]
    probs = Classifier.load(demo_models["edge"].path).predict(X)
    d = decide(probs, 0.8)
    candidates = int(((d.entropy >= 0.5) | (d.margin <= 0.3)).sum())
    assert candidates > 5
    config = edge_config(
        tmp_path,
        mosquitto.port,
        demo_models["edge"].path,
        routing={"escalate": False},
        sampling={"max_per_minute": 5, "entropy_threshold": 0.5, "margin_threshold": 0.3},
    )
    with Collector(mosquitto.host, mosquitto.port, ["fleet/f1/dev-1/#"]) as c:
        async with RunningNode(config) as node:
            await wait_connected(node)
            inputs = [_input(x, f"in-{i}", digits.labels[int(digits.y_test[i])]) for i, x in enumerate(X)]
            await asyncio.to_thread(c.publish_many, INPUT_TOPIC, inputs)
            await asyncio.to_thread(c.wait_for, _answered(len(X)))
        await asyncio.to_thread(c.wait_for, lambda c: len(c.on("telemetry")) >= 1)
        samples = [r.message() for r in c.on("samples")]
        (tele,) = _telemetry(c)
    assert len(samples) == 5
    assert tele.samples.sent == 5 and tele.samples.skipped_budget == candidates - 5
    for s in samples:
        assert isinstance(s, Sample)
        assert s.reasons and (s.entropy >= 0.5 or s.margin <= 0.3)
        assert s.topk[0].label == s.predicted and s.truth is not None
        assert s.input.shape == [64]


async def test_telemetry_numbers_match_a_known_sequence(
    mosquitto: Mosquitto, demo_models: dict[str, DemoModel], digits: DigitsSplit, tmp_path: Path
) -> None:
    X = digits.X_test[:200]
    probs = Classifier.load(demo_models["edge"].path).predict(X)
    d = decide(probs, 0.8)
    config = edge_config(
        tmp_path, mosquitto.port, demo_models["edge"].path, routing={"escalate": False}, telemetry={"max_features": 16}
    )
    with Collector(mosquitto.host, mosquitto.port, ["fleet/f1/dev-1/#"]) as c:
        async with RunningNode(config) as node:
            await wait_connected(node)
            await asyncio.to_thread(c.publish_many, INPUT_TOPIC, [_input(x, f"in-{i}") for i, x in enumerate(X)])
            await asyncio.to_thread(c.wait_for, _answered(len(X)))
        await asyncio.to_thread(c.wait_for, lambda c: len(c.on("telemetry")) >= 1)
        (tele,) = _telemetry(c)
        statuses = [r.message() for r in c.on("status")]
    labels = demo_models["edge"].labels
    expected: dict[str, int] = {}
    for i in d.top1:
        expected[labels[i]] = expected.get(labels[i], 0) + 1
    assert tele.count == 200 and tele.class_counts == expected
    assert tele.confidence is not None and tele.entropy is not None and tele.latency_ms is not None
    assert tele.confidence.mean == pytest.approx(float(d.confidence.mean()), abs=1e-5)
    assert tele.confidence.min == pytest.approx(float(d.confidence.min()), abs=1e-5)
    assert tele.entropy.mean == pytest.approx(float(d.entropy.mean()), abs=1e-4)
    assert tele.latency_ms.p50 <= tele.latency_ms.p95 <= tele.latency_ms.p99 <= tele.latency_ms.max
    assert tele.edge_latency_ms == tele.latency_ms  # escalation off: every answer was final at the edge
    assert tele.features is not None and tele.features.dims == 64 and len(tele.features.mean) == 16
    pooled = X.reshape(200, 16, 4).mean(axis=2)
    assert np.allclose(tele.features.mean, pooled.mean(axis=0), atol=1e-4)
    assert np.allclose(tele.features.std, pooled.std(axis=0), atol=1e-3)
    assert tele.providers is not None and tele.providers.active == ["CPUExecutionProvider"]
    assert tele.resources is not None and tele.resources.rss_mb > 10
    birth, *_, shutdown = [s for s in statuses if isinstance(s, Status)]
    assert (birth.state, shutdown.state, shutdown.reason) == ("online", "offline", "shutdown")
    # One connection: the shutdown status orders after the birth (as its last will would have).
    assert birth.connection is not None and shutdown.connection == birth.connection
    assert birth.order is not None and shutdown.order == birth.order + 1


async def test_offline_falls_back_locally_and_delivers_after_the_broker_returns(
    mosquitto: Mosquitto, demo_models: dict[str, DemoModel], tmp_path: Path
) -> None:
    mosquitto.stop()
    config = edge_config(
        tmp_path,
        mosquitto.port,
        demo_models["edge"].path,
        source={"kind": "replay", "rate_hz": 500.0, "limit": 80, "loop": False},
    )
    async with RunningNode(config) as node:
        # The node has no "N processed" event to wait on; a bounded poll of its window is enough here.
        await wait_for_async(
            lambda: None if node.window is None else node.window.count,
            20,
            "80 inputs in the telemetry window",
            until=lambda n: n is not None and n >= 80,
            interval=0.05,
        )
        # Answered while offline: all queued (results travel several answers to a message, so the
        # depth is no count of answers; the count is checked where they arrive).
        assert node.outbox is not None and node.outbox.depth > 0 and node.link is not None
        assert not node.link.is_connected and node.link.stats.published == 0
        mosquitto.start()
        with Collector(mosquitto.host, mosquitto.port, ["fleet/f1/dev-1/#"]) as c:
            await asyncio.to_thread(c.wait_for, _answered(80))
            results = _results(c)
    assert len({r.inference_id for r in results}) == 80
    unsure = [r for r in results if r.path != "edge"]
    assert unsure and all((r.path, r.fallback_reason) == ("edge_fallback", "offline") for r in unsure)


@pytest.mark.parametrize(
    "rate_hz",
    [200, 20_000],  # one input at a time; a replay far ahead of the model (micro-batches, shared commits)
)
def test_sigterm_drains_and_exits_zero(
    mosquitto: Mosquitto, demo_models: dict[str, DemoModel], tmp_path: Path, rate_hz: int
) -> None:
    config_file = write_edge_config(
        tmp_path,
        mosquitto.port,
        demo_models["edge"].path,
        routing={"escalation_timeout_s": 0.5},
        source={"kind": "replay", "rate_hz": rate_hz, "loop": True},
    )
    with Collector(mosquitto.host, mosquitto.port, ["fleet/f1/dev-1/#"]) as c:
        with run_edge_node(config_file, tmp_path / "edge.log") as proc:
            c.wait_for(_answered(100))
            stop(proc)
        c.wait_for(lambda c: any(r.message().state == "offline" for r in c.on("status")))  # type: ignore[attr-defined]
        results = _results(c)
        (tele,) = _telemetry(c)
    # Every input the node accepted reached the broker: ids are boot-seq numbered without gaps.
    seqs = sorted(int(r.inference_id.rsplit("-", 1)[1]) for r in results)
    assert seqs == list(range(1, len(seqs) + 1))
    assert tele.count == len(results)
    assert "edge node stopped" in proc.log_text()
