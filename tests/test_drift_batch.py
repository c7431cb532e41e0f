"""Batched drift scoring (cloud_bridge/drift/batch.py) gives the per-window path's scores and alerts."""

from __future__ import annotations

import math
import random
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy.engine import make_url

from cloud_bridge.drift.batch import Job, Scored, WindowCache, score_batch
from cloud_bridge.drift.scoring import DriftSettings, complete_baseline, reference_baseline, score_all
from cloud_bridge.drift.store import DriftStore
from cloud_bridge.drift.windows import WindowStats, pool
from cloud_bridge.registry import (
    Batch,
    DriftBaselineRow,
    DriftEpisodeRow,
    DriftStateRow,
    DriftWindowRow,
    Registry,
    TelemetryRow,
)
from devservers.postgres import create_database

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
        assert_scores_equal(batched, jobs)
        for job, got in zip(jobs, batched, strict=True):
            recent = pool(job.windows)
            assert (got.window_start, got.window_end) == (recent.window_start, recent.window_end)
    kinds = {s.kind for r in score_batch(SETTINGS, jobs, cache) for s in r.scores}
    assert kinds == {"prediction_drift", "confidence_drift", "feature_drift", "latency"}


def assert_scores_equal(got: list[Scored], jobs: list[Job]) -> None:
    for job, result in zip(jobs, got, strict=True):
        recent = pool(job.windows)
        want = score_all(SETTINGS, job.baseline, recent)
        assert [s.kind for s in result.scores] == [s.kind for s in want]
        for g, w in zip(result.scores, want, strict=True):
            assert (g.high, g.low) == (w.high, w.low)
            assert math.isclose(g.score, w.score, rel_tol=1e-9, abs_tol=1e-12), (g.kind, g.score, w.score)


def test_a_small_cache_evicts_forgets_and_compacts_without_mixing_windows_up() -> None:
    """Devices' pools move on a window per batch, as at the bridge: rows are reused after `forget`
    and eviction, and label runs are compacted when their array fills; every batch must still read
    its own windows' numbers."""
    rng = np.random.default_rng(11)
    cache = WindowCache(capacity=200)
    jobs = jobs_of(4)
    runs = cache.label_runs
    moved = False
    for t in range(40):  # ~200 label pairs a batch: the 4,096-pair array fills and is compacted
        pools = []
        for d, job in enumerate(jobs):
            new = window(rng, 200.0 + 10 * t, dims=[0, 8, 16][d % 3], labels=3 + d % 5)
            pools.append(Job(job.baseline, [*job.windows[-5:], new]))
            cache.forget(job.windows[:-5])
        jobs = pools
        assert_scores_equal(score_batch(SETTINGS, jobs, cache), jobs)
        moved = moved or cache.label_runs is not runs
    assert moved, "the label runs were never compacted: the test does not test that"
    assert len(cache.windows) <= 200 + sum(len(job.windows) for job in jobs)


def test_a_vocabulary_of_many_labels_scores_the_same() -> None:
    """Thousands of labels (many models): only the labels a batch uses get a PSI column."""
    rng = np.random.default_rng(5)
    jobs = []
    for d in range(30):
        labels = [f"m{d}-class-{i}" for i in range(200)]
        first = []
        for i in range(11):
            w = window(rng, 10.0 * i, dims=0)
            counts = rng.multinomial(w.count, np.ones(len(labels)) / len(labels))
            first.append(replace(w, classes={lb: int(n) for lb, n in zip(labels, counts, strict=True) if n}))
        jobs.append(Job(complete_baseline(None, first[:10]), first[4:]))
    assert_scores_equal(score_batch(SETTINGS, jobs, WindowCache()), jobs)


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


async def run_store(url: str, batched: bool, batches: list[list[dict[str, Any]]], bridges: int = 1) -> dict[str, Any]:
    """Drift over `batches`; with 2 `bridges`, two stores (each with its own cache) take turns."""
    registry = Registry(url)
    await registry.create()
    dialect = registry.engine.dialect.name
    stores = [DriftStore(SETTINGS, dialect, {}, batched=batched) for _ in range(bridges)]
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
        # Misses where a bridge read only what the other changed since it held the state.
        "refreshed": sum(s.rows.cache.refreshed for s in stores),
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


DEVICES = 12


def fleet_batches() -> list[list[dict[str, Any]]]:
    """40 windows of 12 devices, half of them drifting from the 20th, two windows of a device per
    batch in shuffled order."""
    rng = np.random.default_rng(7)
    devices = [f"dev-{d}" for d in range(DEVICES)]
    streams = {
        d: [window(rng, 10.0 * i, shift=0.7 if (i >= 20 and n % 2 == 0) else 0.0) for i in range(40)]
        for n, d in enumerate(devices)
    }
    order = random.Random(3)
    batches: list[list[dict[str, Any]]] = []
    for i in range(0, 40, 2):
        rows = [telemetry_row(d, j, streams[d][j]) for d in devices for j in (i, i + 1)]
        order.shuffle(rows)
        batches.append(rows)
    return batches


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
async def test_the_bridge_path_alerts_the_same_batched_or_per_window(
    tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> None:
    if database == "postgresql":
        port = make_url(request.getfixturevalue("postgres_url")).port
        assert port is not None

        def url_for(name: str) -> str:
            return create_database(port, name)
    else:

        def url_for(name: str) -> str:
            return f"sqlite+aiosqlite:///{tmp_path / name}.db"

    batches = fleet_batches()
    per_window = await run_store(url_for("a"), False, batches)
    batched = await run_store(url_for("b"), True, batches)
    want_lines = per_window.pop("lines")
    assert_same_lines(batched.pop("lines"), want_lines)
    assert batched == per_window
    # Two bridges taking turns read each other's state from the rows (their caches miss); once each
    # holds a device's state, it reads only the windows the other added.
    two = await run_store(url_for("c"), True, batches, bridges=2)
    assert_same_lines(two.pop("lines"), want_lines)
    assert two.pop("refreshed") >= DEVICES * (len(batches) - 3)
    per_window.pop("refreshed")
    assert two == per_window
    assert any(state == "firing" for _, _, _, state in batched["episodes"])
    # Once the baseline is frozen only the newest windows are kept.
    assert len(batched["windows"]) == DEVICES * SETTINGS.recent_windows


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
async def test_two_bridges_agree_with_one_when_late_windows_land_on_the_other(
    tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> None:
    """A window stored late by one bridge lies among the windows the other holds (older than its
    newest): the other must notice it is not its own and read the device's pool whole again."""
    batches = fleet_batches()
    late: list[list[dict[str, Any]]] = [[] for _ in batches]
    for n, rows in enumerate(batches):
        for r in rows:
            # The older window of every third device arrives with the next batch, at the other bridge.
            moved = int(r["device_id"].split("-")[1]) % 3 == 0 and int(r["msg_id"].split("-")[-1]) % 2 == 0
            late[min(n + 1, len(batches) - 1) if moved else n].append(r)
    if database == "postgresql":
        port = make_url(request.getfixturevalue("postgres_url")).port
        assert port is not None
        urls = [create_database(port, "late_one"), create_database(port, "late_two")]
    else:
        urls = [f"sqlite+aiosqlite:///{tmp_path / name}.db" for name in ("one", "two")]
    one = await run_store(urls[0], True, late)
    two = await run_store(urls[1], True, late, bridges=2)
    assert_same_lines(two.pop("lines"), one.pop("lines"))
    assert two.pop("refreshed") > 0
    one.pop("refreshed")
    assert two == one
    assert any(state == "firing" for _, _, _, state in one["episodes"])


async def test_a_baseline_kept_in_the_state_row_by_an_earlier_version_is_read_and_moved(tmp_path: Path) -> None:
    batches = fleet_batches()
    want = await run_store(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", True, batches)
    url = f"sqlite+aiosqlite:///{tmp_path / 'b.db'}"
    await run_store(url, True, batches[:10])  # every baseline frozen (20 windows a device)
    registry = Registry(url)
    try:
        async with registry.engine.begin() as conn:  # where rows made before drift_baselines keep it
            await conn.exec_driver_sql(
                "UPDATE drift_states SET baseline = (SELECT b.baseline FROM drift_baselines b WHERE "
                "b.fleet_id = drift_states.fleet_id AND b.device_id = drift_states.device_id AND "
                "b.model_name = drift_states.model_name AND b.model_version = drift_states.model_version)"
            )
            assert (await conn.exec_driver_sql("DELETE FROM drift_baselines")).rowcount == DEVICES
        rest = await run_store(url, True, batches[10:])  # a restarted bridge: it reads every row
        states = await registry.rows(DriftStateRow)
        baselines = await registry.rows(DriftBaselineRow)
    finally:
        await registry.close()
    assert {k: rest[k] for k in ("episodes", "kinds", "windows")} == {
        k: want[k] for k in ("episodes", "kinds", "windows")
    }
    assert all(s["baseline"] is None for s in states) and len(baselines) == DEVICES
