"""Drift detection: the maths on hand-made windows, the detector on real digits windows through the real
demo model, and the bridge's database-held state with two real bridges splitting one device's stream."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from sqlalchemy import insert, text

from bench.drift import DigitsStream, StreamSpec
from cloud_bridge.app import Bridge, running_bridge
from cloud_bridge.config import (
    BridgeConfig,
    FleetConfig,
    InfluxConfig,
    IngestConfig,
    MqttConfig,
    RegistryConfig,
    load_config,
)
from cloud_bridge.drift.alerts import AlertStats
from cloud_bridge.drift.scoring import (
    Detector,
    DriftSettings,
    KindState,
    Score,
    Transition,
    psi,
    psi_noise,
    score_all,
    step,
)
from cloud_bridge.drift.store import DriftStore, alert_id
from cloud_bridge.drift.windows import Pool, WindowStats, pool
from cloud_bridge.errors import ConfigError
from cloud_bridge.models.store import ModelStore
from cloud_bridge.registry import (
    AlertRow,
    Batch,
    Device,
    DriftBaselineRow,
    DriftEpisodeRow,
    DriftStateRow,
    DriftWindowRow,
    Registry,
    TelemetryRow,
)
from cloud_bridge.tsdb.lines import alert_line, drift_line
from demokit.dataset import DigitsSplit
from demokit.models import DEFAULT_VERSION, DemoModel, build_edge_model
from devservers import Mosquitto, VictoriaMetrics
from edge_node.inference.model import Classifier
from schemas import Alert, Telemetry, decode, encode, new_msg_id, to_builtins
from schemas.topics import Channel, Topics
from tests.edge_harness import RunningNode, edge_config
from tests.factories import MODEL
from tests.mqtt_collector import Collector
from tests.poll import wait_for_async

pytestmark = pytest.mark.timeout(60)

TOPICS = Topics("fleet")
SETTINGS = DriftSettings()


# ---- pure maths ------------------------------------------------------------------------------------
def window(
    end: float,
    count: int = 100,
    classes: dict[str, int] | None = None,
    confidence: float = 0.9,
    p95: float = 2.0,
    mean: float = 5.0,
) -> WindowStats:
    feats = np.full(4, mean)
    return WindowStats(
        window_start=end - 10,
        window_end=end,
        count=count,
        classes=classes if classes is not None else {"a": count // 2, "b": count - count // 2},
        confidence=confidence,
        latency_p95=p95,
        feature_n=count,
        feature_mean=feats,
        feature_std=np.ones(4),
    )


def recent_at(end: float) -> Pool:
    return pool([window(end)])


def test_psi_is_zero_for_the_baseline_mix_and_finite_when_a_class_is_empty() -> None:
    assert psi({"a": 500, "b": 500}, {"a": 0.5, "b": 0.5}, 1000, 0.5) == pytest.approx(0.0, abs=1e-12)
    vanished = psi({"a": 1000}, {"a": 0.5, "b": 0.5}, 1000, 0.5)
    appeared = psi({"a": 500, "b": 400, "c": 100}, {"a": 0.5, "b": 0.5}, 0, 0.5)
    assert np.isfinite(vanished) and vanished > 2.0
    assert np.isfinite(appeared) and appeared > 0.2
    assert psi({"a": 520, "b": 480}, {"a": 0.5, "b": 0.5}, 1000, 0.5) < SETTINGS.psi_low


def test_sampling_noise_is_not_drift_but_a_shift_is() -> None:
    """Ten digits, 50 inferences on each side (a 1 Hz device with a short baseline): the raw PSI of
    two samples of one mix mostly crosses the 0.2 threshold; the score, less the noise, rarely does.
    A real shift (one class from 10% to 40%) still scores far above it."""
    rng = np.random.default_rng(7)
    labels = [str(d) for d in range(10)]
    mix = np.full(10, 0.1)

    def counts(p: np.ndarray, n: int) -> dict[str, int]:
        return {lb: int(c) for lb, c in zip(labels, rng.multinomial(n, p), strict=True) if c}

    def score(recent: dict[str, int], base: dict[str, int], n: int) -> tuple[float, float]:
        base_mix = {lb: c / n for lb, c in base.items()}
        raw = psi(recent, base_mix, n, SETTINGS.psi_pseudocount)
        classes = len(set(recent) | set(base_mix))
        return raw, max(raw - psi_noise(classes, sum(recent.values()), n), 0.0)

    same = [score(counts(mix, 50), counts(mix, 50), 50) for _ in range(400)]
    raw_alarms = np.mean([raw > SETTINGS.psi_high for raw, _ in same])
    alarms = np.mean([value > SETTINGS.psi_high for _, value in same])
    assert raw_alarms > 0.6 and alarms < 0.15, (raw_alarms, alarms)
    shifted = np.full(10, 0.6 / 9)
    shifted[3] = 0.4
    found = [score(counts(shifted, 200), counts(mix, 200), 200)[1] for _ in range(50)]
    assert np.mean([v > SETTINGS.psi_high for v in found]) > 0.9


def test_fires_after_k_windows_above_and_resolves_after_m_below() -> None:
    state = KindState()
    high = Score("prediction_drift", 0.5, 0.2, 0.1, "")
    low = Score("prediction_drift", 0.05, 0.2, 0.1, "")
    between = Score("prediction_drift", 0.15, 0.2, 0.1, "")
    fired = [step(SETTINGS, state, high, recent_at(100 + i)) for i in range(SETTINGS.fire_after)]
    assert fired[:-1] == [None] * (SETTINGS.fire_after - 1)
    assert fired[-1] is not None and fired[-1].state == "firing" and fired[-1].episode == 1
    # Between the thresholds: stays firing however long it lasts.
    assert all(step(SETTINGS, state, between, recent_at(200 + i)) is None for i in range(10))
    resolved = [step(SETTINGS, state, low, recent_at(300 + i)) for i in range(SETTINGS.resolve_after)]
    assert resolved[-1] is not None and resolved[-1].state == "resolved" and resolved[-1].episode == 1
    assert not state.firing


def test_a_flapping_score_never_fires() -> None:
    state = KindState()
    scores = [Score("latency", v, 10.0, 5.0, "") for v in [20.0, 1.0] * 50]
    assert [t for i, s in enumerate(scores) if (t := step(SETTINGS, state, s, recent_at(i))) is not None] == []


def test_cool_down_holds_a_new_episode_back_until_window_time_has_passed() -> None:
    settings = dataclasses.replace(SETTINGS, fire_after=1, resolve_after=1, cooldown_s=300.0)
    state = KindState()
    high, low = Score("feature_drift", 1.0, 0.1, 0.05, ""), Score("feature_drift", 0.0, 0.1, 0.05, "")
    assert step(settings, state, high, recent_at(1000)) is not None
    assert step(settings, state, low, recent_at(1010)) is not None  # resolved: cool-down until 1310
    assert step(settings, state, high, recent_at(1100)) is None
    assert step(settings, state, high, recent_at(1300)) is None
    again = step(settings, state, high, recent_at(1320))
    assert again is not None and again.episode == 2


def scores_by_kind(
    baseline: list[WindowStats], recent: list[WindowStats], s: DriftSettings = SETTINGS
) -> dict[str, Score]:
    detector = Detector(s)
    for w in baseline:
        detector.add(w)
    assert detector.baseline is not None and detector.baseline.ready
    return {sc.kind: sc for sc in score_all(s, detector.baseline, pool(recent))}


def test_latency_breaches_either_the_ratio_to_baseline_or_the_absolute_budget() -> None:
    s = dataclasses.replace(SETTINGS, latency_budget_ms=50.0)
    base = [window(10.0 * i, p95=2.0) for i in range(1, 11)]
    ratio = scores_by_kind(base, [window(200.0, count=300, p95=7.0)], s)["latency"]
    assert ratio.high == pytest.approx(6.0) and ratio.score > ratio.high
    assert scores_by_kind(base, [window(200.0, count=300, p95=5.0)], s)["latency"].score < ratio.high
    slow_base = [window(10.0 * i, p95=30.0) for i in range(1, 11)]
    budget = scores_by_kind(slow_base, [window(200.0, count=300, p95=60.0)], s)["latency"]
    assert budget.high == pytest.approx(50.0) and budget.score > budget.high  # only 2x baseline, over budget
    tiny = scores_by_kind([window(10.0 * i, p95=0.01) for i in range(1, 11)], [window(200.0, count=300, p95=0.5)], s)
    assert tiny["latency"].score < tiny["latency"].high  # 50x a 10 us baseline is still under the 1 ms floor


def test_latency_is_the_devices_own_edge_latency_when_the_device_reports_it() -> None:
    """With more than 5% of answers escalated, the p95 of all answers is the cloud round trip's:
    drift judges the answers final at the edge, and all answers only for devices without them."""
    body: dict[str, Any] = {
        "window_start": 0.0,
        "window_end": 10.0,
        "count": 100,
        "latency_ms": {"p50": 1.0, "p95": 45.0, "p99": 60.0, "max": 80.0, "mean": 5.0},
        "edge_latency_ms": {"p50": 0.8, "p95": 1.2, "p99": 1.5, "max": 2.0, "mean": 0.9},
    }
    assert WindowStats.from_body(body).latency_p95 == 1.2
    older = {k: v for k, v in body.items() if k != "edge_latency_ms"}
    assert WindowStats.from_body(older).latency_p95 == 45.0


def test_feature_z_scores_account_for_sample_size() -> None:
    base = [window(10.0 * i, count=100, mean=5.0) for i in range(1, 11)]  # 1000 samples, std 1
    small = scores_by_kind(base, [window(200.0, count=200, mean=5.3), window(210.0, count=1, mean=5.3)])
    large = scores_by_kind(base, [window(200.0 + i, count=1000, mean=5.3) for i in range(6)])
    assert small["feature_drift"].score == 0.0  # z = 0.3 / sqrt(1/1000 + 1/201) ~ 3.9
    assert large["feature_drift"].score == 1.0  # z = 0.3 / sqrt(1/1000 + 1/6000) ~ 8.8


def test_nothing_is_scored_below_the_minimum_sample_count() -> None:
    detector = Detector(SETTINGS)
    for i in range(1, 11):
        scores, _ = detector.add(window(10.0 * i, count=15))
        assert scores == []
    assert detector.baseline is None  # 150 samples < 200
    scores, _ = detector.add(window(110.0, count=60))
    assert detector.baseline is not None and detector.baseline.ready
    assert scores == []  # the recent pool (last 6 windows) holds 135 < 200
    scores, _ = detector.add(window(120.0, count=150))
    assert {s.kind for s in scores} == {"prediction_drift", "confidence_drift", "feature_drift", "latency"}


def test_tsdb_lines_for_drift_and_alerts() -> None:
    drift = drift_line("f1", "dev 1", "digits-edge", "1.0.0", "prediction_drift", 0.25, 0.2, True, 1_800_000_000.5)
    assert drift == (
        r"drift,device=dev\ 1,fleet=f1,metric=prediction_drift,model=digits-edge,version=1.0.0 "
        "score=0.25,threshold=0.2,firing=1i 1800000000500"
    )
    alert = Alert(
        msg_id=new_msg_id(),
        fleet_id="f1",
        device_id="dev-1",
        ts=1.0,
        alert_id="a",
        kind="latency",
        state="resolved",
        model=MODEL,
        score=3.5,
        threshold=5.0,
        window_start=10.0,
        window_end=20.0,
        detail='p95 "3.5" ms',
    )
    assert alert_line(alert) == (
        "alert,device=dev-1,fleet=f1,kind=latency,model=digits-edge,version=1.0.0 "
        r'state="resolved",score=3.5,threshold=5.0,detail="p95 \"3.5\" ms" 20000'
    )


def test_drift_config_is_validated() -> None:
    config = load_config(None, {"CLOUD_BRIDGE__DRIFT__PSI_HIGH": "0.4", "CLOUD_BRIDGE__DRIFT__FIRE_AFTER": "2"})
    assert config.drift.psi_high == 0.4 and config.drift.fire_after == 2
    with pytest.raises(ConfigError, match=r"\[drift\] psi_low = 0.5 must not exceed psi_high"):
        load_config(None, {"CLOUD_BRIDGE__DRIFT__PSI_LOW": "0.5"})
    with pytest.raises(ConfigError, match="reference_models"):
        load_config(None, {"CLOUD_BRIDGE__DRIFT__REFERENCE_MODELS": "/nonexistent/model.onnx"})


# ---- real digits windows through the real demo edge model -----------------------------------------
@pytest.fixture(scope="module")
def edge_model(tmp_path_factory: pytest.TempPathFactory) -> DemoModel:
    """The demo edge model alone (deterministic: the same file as the demo's), quicker than both models."""
    return build_edge_model(tmp_path_factory.mktemp("drift_model"), DEFAULT_VERSION)


@pytest.fixture(scope="module")
def stream(edge_model: DemoModel, digits: DigitsSplit) -> DigitsStream:
    classifier = Classifier.load(edge_model.path)
    return DigitsStream(classifier, np.asarray(digits.X_test), np.asarray(digits.y_test), "f1", "dev-1")


def run_detector(stream: DigitsStream, drift: str, spec: StreamSpec) -> list[tuple[int, Transition]]:
    detector = Detector(SETTINGS)
    out: list[tuple[int, Transition]] = []
    for index, w in enumerate(stream.windows(spec, drift)):
        out.extend((index, t) for t in detector.add(w)[1])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stationary_digits_stay_quiet(stream: DigitsStream, seed: int) -> None:
    assert run_detector(stream, "none", StreamSpec(windows=60, drift_at=60, seed=seed)) == []


@pytest.mark.parametrize(
    ("drift", "expected"),
    [
        ("noise:4", {"feature_drift"}),
        ("rotation:20", {"feature_drift", "confidence_drift"}),
        ("class_shift:0.3", {"prediction_drift"}),
    ],
)
def test_injected_drift_alerts_within_a_few_windows(stream: DigitsStream, drift: str, expected: set[str]) -> None:
    spec = StreamSpec(windows=30, drift_at=15, seed=3)
    fired = [(i, t) for i, t in run_detector(stream, drift, spec) if t.state == "firing"]
    assert fired, f"{drift} raised no alert"
    assert min(i for i, _ in fired) >= spec.drift_at, "alert before the drift started"
    assert min(i for i, _ in fired) - spec.drift_at < 8
    assert expected <= {t.kind for _, t in fired}


# ---- the bridge: state in the shared database, two bridges on one shared subscription --------------
def bridge_config(
    tmp_path: Path,
    broker: Mosquitto,
    name: str,
    influx: InfluxConfig | None = None,
    registry_url: str | None = None,
    **drift: object,
) -> BridgeConfig:
    base = BridgeConfig()
    return BridgeConfig(
        influx=influx or InfluxConfig(),
        state_dir=str(tmp_path / name),
        mqtt=MqttConfig(host=broker.host, port=broker.port, client_id=name),
        fleet=FleetConfig(shared=True, share_group="drift"),
        registry=RegistryConfig(url=registry_url or f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"),
        drift=dataclasses.replace(base.drift, **drift),  # type: ignore[arg-type]
    )


def device_stream(stream: DigitsStream, device_id: str) -> DigitsStream:
    return DigitsStream(stream.classifier, stream.X, stream.y, "f1", device_id)


def rotation_episode(stream: DigitsStream) -> Iterator[Telemetry]:
    """Stationary, then rotated 20 degrees, then stationary again: one episode of each kind that fires."""
    t0 = 1_790_000_000.0
    yield from stream.telemetry(StreamSpec(windows=30, drift_at=14, seed=4), "rotation:20", t0)
    yield from stream.telemetry(StreamSpec(windows=12, drift_at=12, seed=5), "none", t0 + 300)


def expected_transitions(messages: list[Telemetry]) -> Counter[tuple[str, str]]:
    detector = Detector(BridgeConfig().drift)
    seen: Counter[tuple[str, str]] = Counter()
    for m in messages:
        for t in detector.add(WindowStats.from_body(to_builtins(m)))[1]:
            seen[(t.kind, t.state)] += 1
    return seen


async def publish(broker: Mosquitto, messages: list[Telemetry]) -> None:
    import aiomqtt

    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        for m in messages:
            await client.publish(TOPICS.device(m.fleet_id, m.device_id, Channel.TELEMETRY), encode(m), qos=1)


async def wait_total(
    waits: list[Callable[[Callable[[Any], bool]], Coroutine[Any, Any, None]]], total: Callable[[], int], n: int
) -> None:
    """Wait until `total()` reaches `n` where each of several workers only signals its own progress:
    whichever worker makes the last step wakes its waiter."""

    def done(_stats: object) -> bool:
        return total() >= n

    waiters = [asyncio.create_task(wait(done)) for wait in waits]
    try:
        async with asyncio.timeout(30):
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    assert total() >= n, f"reached {total()}, expected {n}"


async def wait_stored(bridges: list[Bridge], n: int) -> None:
    ingestors = [b.ingestor for b in bridges if b.ingestor is not None]
    await wait_total([i.wait_for for i in ingestors], lambda: sum(i.stats.stored for i in ingestors), n)


async def wait_published(bridges: list[Bridge], n: int) -> None:
    publishers = [b.alerts for b in bridges if b.alerts is not None]
    await wait_total([p.wait_for for p in publishers], lambda: sum(p.stats.published for p in publishers), n)


async def test_two_bridges_sharing_a_device_agree_with_one_detector_and_alert_once(
    tmp_path: Path, mosquitto: Mosquitto, stream: DigitsStream
) -> None:
    messages = list(rotation_episode(device_stream(stream, "dev-rot")))
    expected = expected_transitions(messages)
    assert expected[("feature_drift", "firing")] == 1 and expected[("feature_drift", "resolved")] == 1
    with Collector(mosquitto.host, mosquitto.port, [TOPICS.alerts("f1")], client_id="alerts") as alerts:
        async with (
            running_bridge(bridge_config(tmp_path, mosquitto, "bridge-a")) as a,
            running_bridge(bridge_config(tmp_path, mosquitto, "bridge-b")) as b,
        ):
            # One window at a time, as a device sends them (every 10 s): each is stored before the next.
            for i, m in enumerate(messages, start=1):
                await publish(mosquitto, [m])
                await wait_stored([a, b], i)
            n_alerts = sum(expected.values())
            await wait_published([a, b], n_alerts)
            await asyncio.to_thread(alerts.wait_for, lambda c: len(c.on("alerts")) >= n_alerts)
            stored = [x.ingestor.stats.stored for x in (a, b) if x.ingestor is not None]
            episodes = await a.registry.rows(DriftEpisodeRow)
            alert_rows = await a.registry.rows(AlertRow)
    assert all(n > 0 for n in stored), f"the shared subscription did not split the stream: {stored}"
    got = Counter((r["kind"], r["state"]) for r in episodes)
    assert got == expected, "the bridges' shared state must reach what one detector over the stream reaches"
    assert all(r["published"] for r in episodes)
    received = [decode(r.payload, Alert) for r in alerts.on("alerts")]
    assert Counter((al.kind, al.state) for al in received) == expected
    assert sorted(r["msg_id"] for r in alert_rows) == sorted(al.msg_id for al in received)
    firing = next(al for al in received if al.kind == "feature_drift" and al.state == "firing")
    assert firing.alert_id == alert_id(("f1", "dev-rot", stream.model.name, stream.model.version), "feature_drift", 1)
    assert firing.model == stream.model and firing.window_end > firing.window_start


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
async def test_a_burst_split_over_two_bridges_still_alerts_once_per_episode(
    tmp_path: Path, mosquitto: Mosquitto, stream: DigitsStream, database: str, request: pytest.FixtureRequest
) -> None:
    # SQLite: the batch's first INSERT takes the database write lock; PostgreSQL: SELECT ... FOR UPDATE.
    url = request.getfixturevalue("postgres_url") if database == "postgresql" else None
    devices = ["dev-b1", "dev-b2"]
    messages = [m for d in devices for m in stream_of(device_stream(stream, d))]
    async with (
        running_bridge(bridge_config(tmp_path, mosquitto, "bridge-c", registry_url=url)) as c,
        running_bridge(bridge_config(tmp_path, mosquitto, "bridge-d", registry_url=url)) as d,
    ):
        await publish(mosquitto, messages)  # as fast as the broker takes them: the bridges race
        await wait_stored([c, d], len(messages))
        episodes = await c.registry.rows(DriftEpisodeRow)
        states = await c.registry.rows(DriftStateRow)
        frozen = await c.registry.rows(DriftBaselineRow)
        windows = Counter(r["device_id"] for r in await c.registry.rows(DriftWindowRow))
        stored = [x.ingestor.stats.stored for x in (c, d) if x.ingestor is not None]
    assert all(n > 0 for n in stored), stored
    firing = Counter((r["device_id"], r["kind"]) for r in episodes if r["state"] == "firing")
    for device in devices:
        assert firing[(device, "prediction_drift")] == 1, firing
    assert max(firing.values()) == 1, f"an episode alerted twice: {firing}"
    # Once the baseline is frozen only the newest windows are kept.
    assert sorted(r["device_id"] for r in states) == devices
    assert sorted(r["device_id"] for r in frozen) == devices
    assert windows == {device: SETTINGS.recent_windows for device in devices}


def stream_of(stream: DigitsStream) -> list[Telemetry]:
    return list(stream.telemetry(StreamSpec(windows=30, drift_at=14, seed=6), "class_shift:0.5", 1_790_000_000.0))


async def test_reference_class_mix_from_the_model_file_is_the_prediction_baseline(
    tmp_path: Path, mosquitto: Mosquitto, victoria: VictoriaMetrics, stream: DigitsStream, edge_model: DemoModel
) -> None:
    # Drifted from the first window: only a reference baseline can tell (a window baseline would learn it).
    t0 = time.time() - 600  # victoria-metrics keeps recent points only (docs/traps.md #6)
    spec = StreamSpec(windows=6, drift_at=0, seed=7)
    messages = list(device_stream(stream, "dev-ref").telemetry(spec, "class_shift:0.6", t0))
    influx = InfluxConfig(url=victoria.url, flush_interval_s=0.05)
    config = bridge_config(tmp_path, mosquitto, "bridge-ref", influx, reference_models=(str(edge_model.path),))
    async with running_bridge(config) as bridge:
        await publish(mosquitto, messages)
        await wait_stored([bridge], len(messages))
        baselines = await bridge.registry.rows(DriftStateRow)
        frozen = await bridge.registry.rows(DriftBaselineRow)
        episodes = await bridge.registry.rows(DriftEpisodeRow)
        assert bridge.tsdb is not None and await bridge.tsdb.flush(deadline_s=10)
    (baseline,) = baselines
    assert baseline["source"] == "reference" and frozen == []  # window stats not frozen yet
    assert baseline["class_mix"]["0"] == pytest.approx(0.1, abs=0.02)
    assert [(r["kind"], r["state"]) for r in episodes] == [("prediction_drift", "firing")]
    # In the TSDB: a drift point per scored window (from the 2nd: 200 inferences), one alert point.
    tags = {"fleet": "f1", "device": "dev-ref", "model": stream.model.name, "version": stream.model.version}
    firing = await asyncio.to_thread(victoria.export, '{__name__="drift_firing"}')
    (series,) = firing
    assert series.labels == {**tags, "metric": "prediction_drift"}
    assert series.values == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert series.timestamps_ms == [round(m.window_end * 1000) for m in messages[1:]]
    (alert,) = await asyncio.to_thread(victoria.export, '{__name__="alert_score"}')
    assert alert.labels == {**tags, "kind": "prediction_drift"}
    assert alert.timestamps_ms == [round(messages[3].window_end * 1000)]


async def test_reference_class_mix_of_a_model_registered_in_the_model_store(
    tmp_path: Path, mosquitto: Mosquitto, stream: DigitsStream, edge_model: DemoModel
) -> None:
    config = bridge_config(tmp_path, mosquitto, "bridge-store")
    registry = Registry(config.registry_url)
    await registry.create()
    try:
        await ModelStore(tmp_path / "store", registry).add(edge_model.path)
    finally:
        await registry.close()
    spec = StreamSpec(windows=6, drift_at=0, seed=8)
    messages = list(device_stream(stream, "dev-store").telemetry(spec, "class_shift:0.6"))
    async with running_bridge(config) as bridge:
        await publish(mosquitto, messages)
        await wait_stored([bridge], len(messages))
        (state,) = await bridge.registry.rows(DriftStateRow)
        episodes = await bridge.registry.rows(DriftEpisodeRow)
    assert state["source"] == "reference" and state["model_sha256"] == edge_model.sha256
    assert [(r["kind"], r["state"]) for r in episodes] == [("prediction_drift", "firing")]


async def test_alerts_left_unpublished_are_published_by_the_next_bridge(tmp_path: Path, mosquitto: Mosquitto) -> None:
    registry = Registry(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    await registry.create()
    alert = Alert(
        msg_id=new_msg_id(),
        fleet_id="f1",
        device_id="dev-crash",
        ts=1.0,
        alert_id="drift-x-1",
        kind="latency",
        state="firing",
        model=MODEL,
        score=9.0,
        threshold=6.0,
        window_start=1.0,
        window_end=2.0,
    )
    key = {"fleet_id": "f1", "device_id": "dev-crash", "model_name": MODEL.name, "model_version": MODEL.version}
    row = {**key, "kind": "latency", "episode": 1, "state": "firing", "alert_msg_id": alert.msg_id}
    async with registry.engine.begin() as conn:
        await conn.execute(
            insert(DriftEpisodeRow), [{**row, "payload": encode(alert), "published": False, "created_at": 1.0}]
        )
    await registry.close()
    with Collector(mosquitto.host, mosquitto.port, [TOPICS.alerts("f1")], client_id="alerts2") as alerts:
        async with running_bridge(bridge_config(tmp_path, mosquitto, "bridge-restart")) as bridge:
            await asyncio.to_thread(alerts.wait_for, lambda c: len(c.on("alerts")) >= 1)
            assert bridge.alerts is not None
            async with asyncio.timeout(10):
                await bridge.alerts.wait_for(lambda s: s.published >= 1)
            rows = await bridge.registry.rows(DriftEpisodeRow)
            assert bridge.alerts.stats.recovered == 1
    assert [decode(r.payload, Alert).msg_id for r in alerts.on("alerts")] == [alert.msg_id]
    assert rows[0]["published"] is True


def telemetry_batch(message: Telemetry) -> Batch:
    batch = Batch()
    body = to_builtins(message)
    batch.add_row(
        TelemetryRow,
        {
            "msg_id": message.msg_id,
            "fleet_id": message.fleet_id,
            "device_id": message.device_id,
            "model_name": message.model.name,
            "model_version": message.model.version,
            "window_start": message.window_start,
            "window_end": message.window_end,
            "count": message.count,
            "body": body,
        },
    )
    return batch


async def test_postgresql_evaluations_of_one_device_wait_for_each_other(
    postgres_url: str,
    stream: DigitsStream,
) -> None:
    # Every window scores far above the threshold against this reference mix, so `above` counts windows.
    settings = dataclasses.replace(SETTINGS, min_samples=50, recent_windows=1, fire_after=10)
    store = DriftStore(settings, "postgresql", {stream.model.sha256: {"0": 1.0}})
    messages = list(device_stream(stream, "dev-lock").telemetry(StreamSpec(windows=3, drift_at=3), "none"))
    runs = [store.start(telemetry_batch(m)) for m in messages]
    registry = Registry(postgres_url)
    await registry.create()
    try:
        async with registry.engine.begin() as conn:
            await conn.run_sync(runs[0].apply)  # type: ignore[union-attr]
        first = await registry.engine.connect()
        await first.begin()
        await first.run_sync(runs[1].apply)  # type: ignore[union-attr]  # holds the device's lock, uncommitted

        async def second() -> None:
            async with registry.engine.begin() as conn:
                await conn.run_sync(runs[2].apply)  # type: ignore[union-attr]

        task = asyncio.create_task(second())
        waiting = text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
        async with registry.engine.connect() as probe:

            async def lock_waits() -> int:
                if task.done():
                    task.result()  # raises what made it fail
                    raise AssertionError("the second evaluation did not wait for the first one's lock")
                return int((await probe.execute(waiting)).scalar_one())

            # Bounded polling: a lock wait has no event to wait on.
            await wait_for_async(lock_waits, 15, "the second evaluation to wait for the first one's lock")
        assert not task.done()
        await first.commit()
        await first.close()
        await asyncio.wait_for(task, 15)
        states = await registry.rows(DriftStateRow)
    finally:
        await registry.close()
    (state,) = states
    # The second transaction read the first's committed state after the lock: no lost update.
    assert state["kinds"]["prediction_drift"]["above"] == 3


def published_more_than(n: int) -> Callable[[AlertStats], bool]:
    return lambda stats: stats.published > n


async def test_a_real_edge_node_replaying_rotated_digits_raises_feature_drift(
    tmp_path: Path, mosquitto: Mosquitto, edge_model: DemoModel
) -> None:
    rate_hz, interval_s, stationary_windows = 400.0, 0.5, 14
    drift_after = int(rate_hz * interval_s * stationary_windows)
    node_config = edge_config(
        tmp_path / "node",
        mosquitto.port,
        edge_model.path,
        device={"fleet_id": "f1", "device_id": "dev-edge"},
        routing={"escalate": False, "publish_results": False},
        telemetry={"interval_s": interval_s},
        source={
            "kind": "replay",
            "rate_hz": rate_hz,
            "loop": True,
            "drift": "rotation",
            "drift_strength": 20.0,
            "drift_after": drift_after,
        },
    )
    async with running_bridge(bridge_config(tmp_path, mosquitto, "bridge-edge")) as bridge, RunningNode(node_config):
        assert bridge.alerts is not None
        publisher = bridge.alerts
        async with asyncio.timeout(45):
            while True:
                await publisher.wait_for(published_more_than(publisher.stats.published))
                episodes = await bridge.registry.rows(DriftEpisodeRow)
                if any(r["kind"] == "feature_drift" for r in episodes):
                    break
        telemetry = sorted(await bridge.registry.rows(TelemetryRow), key=lambda r: r["window_end"])
    ends = [r["window_end"] for r in telemetry if r["count"] > 0]
    firing = [decode(r["payload"], Alert) for r in episodes if r["state"] == "firing"]
    first = min(firing, key=lambda a: a.window_end)
    # Windows before the rotation began (about `stationary_windows` of them) raised nothing.
    assert ends.index(first.window_end) >= stationary_windows - 1, (first, len(ends))
    assert "feature_drift" in {a.kind for a in firing}


def _shifted(message: Telemetry, by: float) -> Telemetry:
    """A copy of a window, dated `by` seconds off (a device clock that is wrong), with its own msg_id."""
    return msgspec.structs.replace(
        message,
        msg_id=new_msg_id(),
        ts=message.ts + by,
        window_start=message.window_start + by,
        window_end=message.window_end + by,
    )


async def test_windows_dated_a_day_ahead_or_behind_do_not_stop_drift_scoring(
    tmp_path: Path, mosquitto: Mosquitto, stream: DigitsStream
) -> None:
    """Seen before: one window a day ahead set devices.last_seen a day ahead and switched drift scoring
    off for that device for a day (later windows counted as late redeliveries)."""
    # Windows 10 s apart, the first 14 in the past and the rest in the next minutes (the bridge lets an
    # hour pass here), so that a clamped window (dated its arrival) is followed by later ones, as in
    # a live stream.
    windows = list(
        device_stream(stream, "dev-clock").telemetry(
            StreamSpec(windows=30, drift_at=16, seed=4), "rotation:20", time.time() - 150
        )
    )
    ahead, behind = _shifted(windows[13], 86_400.0), _shifted(windows[14], -86_400.0)
    messages = [*windows[:14], ahead, behind, *windows[14:]]
    config = dataclasses.replace(
        bridge_config(tmp_path, mosquitto, "bridge-clock"), ingest=IngestConfig(max_future_s=3600.0)
    )
    async with running_bridge(config) as bridge:
        await publish(mosquitto, messages)
        await wait_stored([bridge], len(messages))
        assert bridge.ingestor is not None and bridge.ingestor.stats.future_ts == 1
        stored = {row["msg_id"]: row for row in await bridge.registry.rows(TelemetryRow)}
        (device,) = await bridge.registry.rows(Device)
        episodes = await bridge.registry.rows(DriftEpisodeRow)
    # The window a day ahead is stored at its arrival (clamped, its length kept); the one a day
    # behind is stored as dated; the device was not seen a day in the future.
    assert abs(stored[ahead.msg_id]["window_end"] - time.time()) < 120
    assert stored[ahead.msg_id]["window_end"] - stored[ahead.msg_id]["window_start"] == pytest.approx(10.0, abs=0.01)
    assert stored[behind.msg_id]["window_end"] == pytest.approx(behind.window_end)
    assert device["last_seen"] < time.time() + 3600
    # ... and the rotation that began after them still raised its alerts.
    assert {(r["kind"], r["state"]) for r in episodes} >= {("feature_drift", "firing"), ("prediction_drift", "firing")}
