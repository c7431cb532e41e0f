"""fleetsim's payloads decode and validate as the bridge decodes them, into the typed message the
simulator meant; status and result/2 are byte for byte what schemas.compact.encode_compact makes of
it (random device states: every mix of answer paths, one answer and many), and the frames that keep
random float32 data in a stored block stay within 15% of its size (5-10% larger)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fleetsim.device import FEATURES, Device, Population
from fleetsim.profile import Profile
from fleetsim.wire import Row, float32
from schemas import (
    Answer,
    EscalationRequest,
    Results,
    Sample,
    Status,
    Telemetry,
    decode_for_topic,
)
from schemas.compact import encode_compact
from schemas.topics import Channel, Topics

TOPICS = Topics("fleet")


def _device() -> Device:
    return Device(TOPICS, "sim", "sim-000042", 0, "abc123")


def _rows(rng: np.random.Generator, n: int) -> list[Row]:
    rows: list[Row] = []
    for k in range(n):
        label, edge = int(rng.integers(10)), int(rng.integers(10))
        path = str(rng.choice(["edge", "cloud", "edge_fallback"]))
        conf, lat = float32(float(rng.random())), float32(float(rng.random() * 50))
        if path == "edge":
            rows.append((int(k * rng.integers(1, 3)), edge, edge, -1, "edge", None, conf, lat))
        elif path == "cloud":
            rows.append((k + 100, label, edge, label, "cloud", None, conf, lat))
        else:
            rows.append((k + 200, edge, edge, -1, "edge_fallback", "timeout", conf, lat))
    return rows


def _answer(prefix: str, row: Row) -> Answer:
    number, label, edge, cloud, path, reason, conf, lat = row
    return Answer(
        inference_id=f"{prefix}{number}",
        label=str(label),
        index=label,
        confidence=conf,
        path=path,  # type: ignore[arg-type]
        fallback_reason=reason,  # type: ignore[arg-type]
        edge_label=str(edge),
        cloud_label=None if cloud < 0 else str(cloud),
        latency_ms=lat,
    )


@pytest.mark.parametrize("seed", range(40))
def test_results_frames_equal_encode_compact(seed: int) -> None:
    rng = np.random.default_rng(seed)
    device = _device()
    rows = _rows(rng, int(rng.choice([1, 2, 3, 10, 40])))
    if seed % 4 == 0:  # all one path: the optional columns complete, or absent
        path = ["edge", "cloud", "edge_fallback", "edge"][seed % 3]
        rows = [r for r in rows if r[4] == path] or rows
    device.pending = list(rows)
    now = 1_800_000_000.25 + seed
    payload = device.results(now, 256, track=True)
    message = decode_for_topic(TOPICS, device.topic[Channel.RESULTS], payload)
    assert isinstance(message, Results)
    expected = Results(
        msg_id=message.msg_id,
        fleet_id="sim",
        device_id=device.name,
        ts=now,
        seq=1,
        model=message.model,
        answers=[_answer(device.inference_prefix, r) for r in rows],
    )
    assert message == expected
    assert payload == encode_compact(expected)
    assert device.unconfirmed == {1: now}


def test_telemetry_escalation_and_sample_frames_equal_encode_compact() -> None:
    rng = np.random.default_rng(7)
    profile = Profile(drift_share=0.5)
    now = time.time()
    pop = Population(4, profile, rng, now - 20)
    pop.start_drift(np.array([0]))
    pop.classes[:2] = rng.integers(0, 5, (2, 10))
    pop.paths[1] = [7, 2, 1]
    pop.escalations[1] = [3, 2, 1]
    pop.samples[1] = 1
    for index, (counts, mean, std) in enumerate(pop.close_windows(np.array([0, 1]), now, rng)):
        device = Device(TOPICS, "sim", f"sim-{index:06d}", index, "ff")
        device.drifting = index == 0
        payload = device.telemetry(now, counts, mean, std, track=False)
        message = decode_for_topic(TOPICS, device.topic[Channel.TELEMETRY], payload)
        assert isinstance(message, Telemetry) and message.features is not None
        assert message.features.mean == np.frombuffer(mean, "<f4").tolist()
        assert len(message.features.std) == FEATURES
        assert message.count == sum(counts.classes)
        # The simulator stores the random float32 statistics instead of deflating them; deflating the
        # whole message finds a few bytes of matches in them, or loses a few to block headers: over
        # 600 windows -6..+14 B on ~750 B. "Never smaller" failed on a quarter of the runs.
        reference = len(encode_compact(message))
        assert 0.98 * reference <= len(payload) <= 1.15 * reference
        assert not device.unconfirmed  # not tracked
    assert pop.classes[:2].sum() == 0  # the windows restarted
    device = _device()
    data = pop.inputs(np.array([2, 3]), rng)  # not drifting: drifted inputs clip to 16 and compress
    payload = device.escalation(now, 17, 3, float32(0.55), data[0], 2.0)
    request = decode_for_topic(TOPICS, device.topic[Channel.ESCALATE], payload)
    assert isinstance(request, EscalationRequest)
    assert request.request_id == "sim-000042-17" and request.deadline == now + 2.0
    assert request.input.data == data[0]
    assert len(encode_compact(request)) <= len(payload) <= 1.15 * len(encode_compact(request))
    payload = device.sample(now, 18, 3, float32(0.55), data[1], track=True)
    sample = decode_for_topic(TOPICS, device.topic[Channel.SAMPLES], payload)
    assert isinstance(sample, Sample) and sample.seq == 1
    assert sample.input.data == data[1] and [t.label for t in sample.topk] == ["3", "4"]
    assert len(encode_compact(sample)) <= len(payload) <= 1.15 * len(encode_compact(sample))


def test_msg_ids_carry_the_scheduled_time_and_are_unique() -> None:
    from schemas import msg_id_time

    device = _device()
    scheduled = 1_800_000_123.5
    ids = set()
    for k in range(200):
        device.pending = [(k, 1, 1, -1, "edge", None, 0.5, 0.25)]
        message = decode_for_topic(TOPICS, device.topic[Channel.RESULTS], device.results(scheduled, 256, True))
        assert message.ts == scheduled and message.seq == k + 1
        assert msg_id_time(message.msg_id) == pytest.approx(scheduled, abs=0.001)
        ids.add(message.msg_id)
    assert len(ids) == 200


def test_status_frames_equal_encode_compact() -> None:
    device = _device()
    for online in (True, False):
        payload = device.status(1_800_000_000.5, online, track=True)
        message = decode_for_topic(TOPICS, device.topic[Channel.STATUS], payload)
        assert isinstance(message, Status) and message.outbox_epoch == "abc123"
        assert payload == encode_compact(message)
    assert list(device.unconfirmed) == [1, 2]
