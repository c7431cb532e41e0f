"""Batched drift scoring (cloud_bridge/drift/batch.py) gives the per-window path's scores and alerts."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_bridge.drift.batch import Job, WindowCache, score_batch
from cloud_bridge.drift.scoring import DriftSettings, complete_baseline, reference_baseline, score_all
from cloud_bridge.drift.store import DriftStore
from cloud_bridge.drift.windows import WindowStats, pool
from cloud_bridge.registry import Batch, DriftEpisodeRow, DriftStateRow, DriftWindowRow, Registry, TelemetryRow

SETTINGS = DriftSettings()


def window(rng: np.random.Generator, t: float, *, shift: float = 0.0, dims: int = 8, labels: int = 4) -> WindowStats:
    count = int(rng.integers(60, 140))
    mix = rng.dirichlet(np.ones(labels) * 20 * (1 - shift) + 0.1)
    mix[0] += shift
    counts = rng.multinomial(count, mix / mix.sum())
    classes = {str(i): int(n) for i, n in enumerate(counts) if n or rng.random() < 0.5}
    return WindowStats(
        window_start=t,
        window_end=t + 10,
        count=count,
        classes=classes,
        confidence=None if rng.random() < 0.1 else float(0.9 - shift * 0.3 + rng.normal(0, 0.01)),
        latency_p95=None if rng.random() < 0.1 else float(1.0 + rng.random() + shift * 5),
        feature_n=count if dims else 0,
        feature_mean=rng.normal(shift * 3, 1, dims) if dims else None,
        feature_std=np.abs(rng.normal(1, 0.1, dims)) if dims else None,
    )


def jobs_of(seed: int) -> list[Job]:
    rng = np.random.default_rng(seed)
    jobs = []
    for d in range(60):
        dims = [0, 8, 16][d % 3]
        first = [window(rng, 10.0 * i, dims=dims) for i in range(10)]
        base = complete_baseline(reference_baseline({"0": 1, "1": 1, "5": 2}) if d % 4 == 0 else None, first)
        shift = 0.0 if d % 2 else float(rng.random() * 0.8)
        recent = [window(rng, 100.0 + 10 * i, shift=shift, dims=dims) for i in range(1 + d % 6)]
        jobs.append(Job(base, recent))
    return jobs


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_batched_scores_equal_the_per_window_scores(seed: int) -> None:
    jobs = jobs_of(seed)
    cache = WindowCache()
    for _ in range(2):  # the second pass reads every window from the cache
        batched = score_batch(SETTINGS, jobs, cache)
        for job, got in zip(jobs, batched, strict=True):
            recent = pool(job.windows)
            want = score_all(SETTINGS, job.baseline, recent)
            assert [s.kind for s in got.scores] == [s.kind for s in want]
            for g, w in zip(got.scores, want, strict=True):
                assert (g.high, g.low) == (w.high, w.low)
                assert math.isclose(g.score, w.score, rel_tol=1e-9, abs_tol=1e-12), (g.kind, g.score, w.score)
            assert (got.window_start, got.window_end) == (recent.window_start, recent.window_end)
    kinds = {s.kind for r in score_batch(SETTINGS, jobs, cache) for s in r.scores}
    assert kinds == {"prediction_drift", "confidence_drift", "feature_drift", "latency"}


def telemetry_row(device: str, index: int, w: WindowStats) -> dict[str, Any]:
    body = {
        "window_start": w.window_start,
        "window_end": w.window_end,
        "count": w.count,
        "class_counts": dict(w.classes),
        "confidence": None if w.confidence is None else {"mean": w.confidence},
        "edge_latency_ms": None if w.latency_p95 is None else {"p95": w.latency_p95},
        "features": None
        if w.feature_mean is None or w.feature_std is None
        else {"n": w.feature_n, "mean": w.feature_mean.tolist(), "std": w.feature_std.tolist()},
        "model": {"sha256": "a" * 64},
    }
    return {
        "msg_id": f"{device}-{index}",
        "fleet_id": "f1",
        "device_id": device,
        "model_name": "m",
        "model_version": "1",
        "window_start": w.window_start,
        "window_end": w.window_end,
        "count": w.count,
        "body": body,
    }


async def run_store(path: Path, batched: bool, batches: list[list[dict[str, Any]]], bridges: int = 1) -> dict[str, Any]:
    """Drift over `batches`; with 2 `bridges`, two stores (each with its own cache) take turns."""
    registry = Registry(f"sqlite+aiosqlite:///{path}")
    await registry.create()
    stores = [DriftStore(SETTINGS, "sqlite", {}, batched=batched) for _ in range(bridges)]
    lines: list[str] = []
    try:
        for n, rows in enumerate(batches):
            store = stores[n % bridges]
            batch = Batch()
            for row in rows:
                batch.seen.append({"msg_id": row["msg_id"], "received_at": 0.0})
                batch.add_row(TelemetryRow, row)
            run = store.start(batch)
            await registry.commit_batch(batch)
            if run is not None:
                lines.extend(run.lines)
        episodes = await registry.rows(DriftEpisodeRow)
        states = await registry.rows(DriftStateRow)
        windows = await registry.rows(DriftWindowRow)
    finally:
        await registry.close()
    return {
        "episodes": sorted((e["device_id"], e["kind"], e["episode"], e["state"]) for e in episodes),
        "kinds": {s["device_id"]: {k: v["firing"] for k, v in s["kinds"].items()} for s in states},
        "windows": sorted((w["device_id"], w["window_end"]) for w in windows),
        "lines": lines,
        "evaluations": sum(s.stats.evaluations for s in stores),
    }


def assert_same_lines(got: list[str], want: list[str]) -> None:
    """The same TSDB lines in the same order; scores equal up to the last bits (sums ordered otherwise)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if g == w:
            continue
        g_head, g_score, g_tail = re.fullmatch(r"(.*?[ ,]score=)([^,]+)(,.*)", g).groups()  # type: ignore[union-attr]
        w_head, w_score, w_tail = re.fullmatch(r"(.*?[ ,]score=)([^,]+)(,.*)", w).groups()  # type: ignore[union-attr]
        assert (g_head, g_tail) == (w_head, w_tail)
        assert math.isclose(float(g_score), float(w_score), rel_tol=1e-9, abs_tol=1e-12), (g, w)


async def test_the_bridge_path_alerts_the_same_batched_or_per_window(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    devices = [f"dev-{d}" for d in range(12)]
    streams = {
        d: [window(rng, 10.0 * i, shift=0.7 if (i >= 20 and n % 2 == 0) else 0.0) for i in range(40)]
        for n, d in enumerate(devices)
    }
    order = random.Random(3)
    batches: list[list[dict[str, Any]]] = []
    for i in range(0, 40, 2):  # two windows of a device in some batches, devices in shuffled order
        rows = [telemetry_row(d, j, streams[d][j]) for d in devices for j in (i, i + 1)]
        order.shuffle(rows)
        batches.append(rows)
    per_window = await run_store(tmp_path / "a.db", False, batches)
    batched = await run_store(tmp_path / "b.db", True, batches)
    want_lines = per_window.pop("lines")
    assert_same_lines(batched.pop("lines"), want_lines)
    assert batched == per_window
    # Two bridges taking turns read each other's state from the rows (their caches miss).
    two = await run_store(tmp_path / "c.db", True, batches, bridges=2)
    assert_same_lines(two.pop("lines"), want_lines)
    assert two == per_window
    assert any(state == "firing" for _, _, _, state in batched["episodes"])
    # Once the baseline is frozen only the newest windows are kept.
    assert len(batched["windows"]) == len(devices) * SETTINGS.recent_windows
