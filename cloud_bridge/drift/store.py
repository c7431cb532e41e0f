"""Drift state in the shared registry database, evaluated inside the ingest transaction.

Why the database: bridges share the telemetry subscription (`$share/...`), so one device's windows
are dealt to whichever bridge is free, and no single bridge sees a device's whole stream. Rather
than partitioning devices over bridges (which needs coordination and breaks when a bridge dies),
every piece of drift state lives in the registry database that all bridges already share:

* `drift_states`: one row per (device, model version) holding each kind's hysteresis counters,
  episode number and cool-down, the baseline's class mix and the newest window evaluated; the
  windows it is scored on (all of them until the baseline is frozen, then the newest
  `recent_windows`) are rows of `drift_windows`, the frozen baseline a row of `drift_baselines`;
* `drift_episodes`: one row per alert transition, keyed (device, model, version, kind, episode,
  state): the alert's dedup key, its encoded payload and whether it was published.

Each batch, after writing its rows, locks the state row of every (device, model version) it has
windows for (`SELECT ... FOR UPDATE` on PostgreSQL, in key order so bridges cannot deadlock; on
SQLite the batch already holds the database write lock from its first INSERT), reads their state,
scores, and writes the new state and any alerts before committing. Evaluations of
one device are therefore serialised across bridges and computed only from committed rows, so any
bridge reaches the same answer a single bridge would, and the primary key of `drift_episodes` makes
a duplicate alert impossible even if two bridges raced. A window older than the newest one already
evaluated (a late redelivery) joins the pool but is not scored, so hysteresis only moves forward.

This module runs the evaluation (`DriftRun`) and records alerts; the state rows are read, locked and
written in cloud_bridge/drift/state.py, and encoded as cloud_bridge/drift/codec.py says.

The cost stays off the per-message path: nothing happens for messages other than telemetry, and a
batch with telemetry adds four statements for all its devices together (read and lock the tokens;
insert new windows, delete old ones, update the states), plus three per alert and three more reads
when another bridge changed a device's state since this one saved it.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import operator
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from cloud_bridge.drift.batch import Job, Scored, WindowCache, detail_for, score_arrays
from cloud_bridge.drift.codec import WindowCodec, finite
from cloud_bridge.drift.evaluate import Stepped, step_scored, step_scores
from cloud_bridge.drift.scoring import (
    DriftSettings,
    Transition,
    baseline_complete,
    complete_baseline,
    score_all,
)
from cloud_bridge.drift.state import Key, KeyState, StateCache, StateRows
from cloud_bridge.drift.windows import WindowStats, pool
from cloud_bridge.errors import ReferenceModelError
from cloud_bridge.registry import AlertRow, Batch, DriftEpisodeRow, SeenMessage, TelemetryRow
from cloud_bridge.tsdb.lines import alert_line
from common.onnx import load_model
from schemas import Alert, ModelRef, encode, new_msg_id

log = logging.getLogger(__name__)

_window_end = operator.attrgetter("window_end")


def _window_end_of(w: NewWindow) -> float:
    return w.stats.window_end


def load_reference_mixes(paths: Iterable[str | Path]) -> dict[str, dict[str, float]]:
    """sha256 -> reference class mix of every .onnx file given (or inside a given directory); a model
    without one is skipped, a file that is not a classifier (common/onnx.py) is refused."""
    mixes: dict[str, dict[str, float]] = {}
    for entry in paths:
        base = Path(entry)
        files = sorted(base.glob("*.onnx")) if base.is_dir() else [base]
        for file in files:
            if not file.is_file():
                raise ReferenceModelError(f"[drift] reference_models: {file} does not exist; point it at .onnx files")
            try:
                data = file.read_bytes()
                mix = load_model(file, data=data, error=ReferenceModelError).card.reference_class_mix
            except OSError as exc:
                raise ReferenceModelError(f"[drift] reference_models: cannot read {file}: {exc}") from None
            except ReferenceModelError as exc:
                raise ReferenceModelError(f"[drift] reference_models: {exc}") from None
            if mix is None:
                log.warning("model has no reference_class_mix metadata, skipped path=%s", file)
                continue
            mixes[hashlib.sha256(data).hexdigest()] = mix
    return mixes


@dataclass(slots=True)  # one per telemetry window: a frozen dataclass costs ~1 us more to make
class NewWindow:
    key: Key
    sha256: str
    msg_id: str
    stats: WindowStats


@dataclass(frozen=True)
class PendingAlert:
    """An alert committed with its batch and still to be published (payload as stored)."""

    alert: Alert
    payload: bytes


@dataclass
class DriftStats:
    windows: int = 0
    evaluations: int = 0
    late_windows: int = 0
    alerts: int = 0
    errors: int = 0


def alert_id(key: Key, kind: str, episode: int) -> str:
    """Stable id shared by an episode's firing and resolved alerts (RefId allows 128 characters)."""
    digest = hashlib.sha256("/".join((*key, kind)).encode()).hexdigest()[:20]
    return f"drift-{digest}-{episode}"


class DriftStore:
    """Builds a `DriftRun` for each ingest batch that carries telemetry."""

    def __init__(
        self,
        settings: DriftSettings,
        dialect: str,
        references: Mapping[str, Mapping[str, float]],
        *,
        batched: bool = True,
        cache: StateCache | None = None,
    ) -> None:
        self.settings = settings
        self.dialect = dialect
        self.references = dict(references)
        self.stats = DriftStats()
        self.codec = WindowCodec()
        self.rows = StateRows(self.insert, self.codec, self.references, cache)
        # False: pool and score each window on its own (the per-window path, for benches and tests).
        self.batched = batched
        self.window_cache = WindowCache()

    def status(self) -> str:
        """For the bridge's status line. Cache misses are windows whose device state another bridge
        wrote last (or this one before a restart): read again from the registry, the cost two
        bridges pay over one; refreshed ones are misses where only the other bridge's changes were read."""
        cache = self.rows.cache
        return (
            f"drift_windows={self.stats.windows} drift_alerts={self.stats.alerts} "
            f"drift_cache_hits={cache.hits} drift_cache_misses={cache.misses} drift_cache_refreshed={cache.refreshed}"
        )

    def insert(self, table: Any) -> Any:
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    def start(self, batch: Batch) -> DriftRun | None:
        """Attach drift evaluation to `batch` (as a hook run inside its transaction)."""
        windows: list[NewWindow] = []
        for row in batch.rows.get(TelemetryRow, ()):
            if row["count"] <= 0:
                continue  # an idle window says nothing about drift
            body = row["body"]
            key = (row["fleet_id"], row["device_id"], row["model_name"], row["model_version"])
            try:
                stats = WindowStats.from_body(body, batch.features.get(row["msg_id"]))
            except (ValueError, TypeError, KeyError) as exc:
                # The message is valid telemetry (it is stored); only its drift statistics are unusable.
                self.stats.errors += 1
                log.error(
                    "telemetry window not usable for drift msg_id=%s device=%s error=%r", row["msg_id"], key[1], exc
                )
                continue
            windows.append(NewWindow(key, body["model"]["sha256"], row["msg_id"], stats))
        if not windows:
            return None
        run = DriftRun(self, windows)
        batch.hooks.append(run.apply)
        return run


@dataclass
class DriftRun:
    """Drift evaluation of one batch; `lines` and `alerts` are valid once the batch committed."""

    store: DriftStore
    windows: list[NewWindow]
    lines: list[str] = field(default_factory=list)
    alerts: list[PendingAlert] = field(default_factory=list)

    def apply(self, conn: Connection) -> None:
        # A retried commit runs this again on a fresh transaction: start from nothing. One statement
        # locks the state of every device in the batch (a statement is a thread hop with aiosqlite),
        # whatever the number of devices; one pass of numpy scores them all (cloud_bridge/drift/batch.py).
        self.lines, self.alerts = [], []
        by_key: dict[Key, list[NewWindow]] = {}
        for w in self.windows:
            queue = by_key.get(w.key)
            if queue is None:
                by_key[w.key] = [w]
            else:
                queue.append(w)
        states = self.store.rows.lock(conn, {k: v[0].sha256 for k, v in by_key.items()})
        # Round r takes each device's r-th new window (in window time): a device's windows are scored
        # in order, and every device with an r-th window is scored in the same numpy pass.
        keys = sorted(by_key)
        rounds = 1
        now = time.time()
        for key in keys:
            queue = by_key[key]
            if len(queue) > 1:
                queue.sort(key=_window_end_of)
                rounds = max(rounds, len(queue))
            # The newest window evaluated can never honestly lie in the bridge's future: if a device's
            # clock put it there, it must not keep later windows from being scored (they would all look
            # like late redeliveries until the bridge's clock caught up).
            st = states[key]
            if st.last_window_end > now:
                st.last_window_end = now
        failed: set[Key] = set()
        transitions: list[Stepped] = []
        for r in range(rounds):
            items: list[tuple[Key, KeyState, Job]] = []
            for key in keys:
                queue = by_key[key]
                if r >= len(queue) or key in failed:
                    continue
                st = states[key]
                try:
                    job = self._advance(key, st, queue[r])
                except (ValueError, TypeError, KeyError, ArithmeticError) as exc:
                    self._failed(key, exc, failed)
                    continue
                if job is not None:
                    items.append((key, st, job))
            if items:
                self._evaluate(items, failed, transitions)
        evaluated = {key: states[key] for key in keys if key not in failed}
        self.store.rows.save(conn, evaluated)
        s = self.store.settings
        for key, job, transition in transitions:
            if key not in failed:
                if not transition.score.detail:
                    transition = replace(transition, score=detail_for(s, job, transition.score))
                self._alert(conn, key, states[key].sha256, transition)
        self.store.stats.windows += len(self.windows)

    def _failed(self, key: Key, exc: Exception, failed: set[Key]) -> None:
        # Bad numbers in one device's telemetry must not stop ingestion (the messages are stored).
        self.store.stats.errors += 1
        failed.add(key)
        log.error("drift evaluation failed fleet=%s device=%s model=%s version=%s error=%r", *key, exc)

    # ---- pure part --------------------------------------------------------------------------------
    def _advance(self, key: Key, st: KeyState, w: NewWindow) -> Job | None:
        """Add one new window to the device's state; the evaluation it calls for, if any."""
        store = self.store
        recent = store.settings.recent_windows
        stats = w.stats
        end = stats.window_end
        windows = st.windows
        if not windows or end >= windows[-1].window_end:
            windows.append(stats)  # the usual case: insort would put it last as well
        else:
            bisect.insort(windows, stats, key=_window_end)
        st.added.append((w.msg_id, stats))
        job: Job | None = None
        baseline = st.baseline
        if end < st.last_window_end:
            # A late redelivery joins the pool it belongs to but is not scored: hysteresis only
            # moves forward in window time.
            store.stats.late_windows += 1
        else:
            st.last_window_end = end
            if (baseline is None or baseline.stats is None) and baseline_complete(store.settings, windows):
                baseline = st.baseline = complete_baseline(baseline, windows)
                log.info("drift baseline frozen fleet=%s device=%s model=%s version=%s windows=%d", *key, len(windows))
            if baseline is not None:
                job = Job(baseline, windows[-recent:])
        if baseline is not None and baseline.stats is not None and len(windows) > recent:
            gone = len(windows) - recent
            store.window_cache.forget(windows[:gone])
            del windows[:gone]
            st.dropped = True
        return job

    def _evaluate(self, items: list[tuple[Key, KeyState, Job]], failed: set[Key], out: list[Stepped]) -> None:
        """Score one round's jobs and step their hysteresis (a scoring error fails the whole round)."""
        s = self.store.settings
        store = self.store
        try:
            if store.batched:
                scores = score_arrays(s, [job for _, _, job in items], store.window_cache)
            else:
                scored = []
                for _, _, job in items:
                    recent = pool(job.windows)
                    scored.append(Scored(recent.window_start, recent.window_end, score_all(s, job.baseline, recent)))
        except (ValueError, TypeError, KeyError, ArithmeticError) as exc:
            for key, _, _ in items:
                self._failed(key, exc, failed)
            return
        store.stats.evaluations += len(items)
        if store.batched:
            out.extend(step_scores(s, items, scores, self.lines))
        else:
            for (key, st, job), result in zip(items, scored, strict=True):
                out.extend(step_scored(s, key, st, job, result, self.lines))

    def _alert(self, conn: Connection, key: Key, sha256: str, t: Transition) -> None:
        fleet_id, device_id, name, version = key
        score = t.score
        alert = Alert(
            msg_id=new_msg_id(),
            fleet_id=fleet_id,
            device_id=device_id,
            ts=time.time(),
            alert_id=alert_id(key, t.kind, t.episode),
            kind=t.kind,
            state=t.state,
            model=ModelRef(name=name, version=version, sha256=sha256),
            score=finite(score.score),
            threshold=score.high if t.state == "firing" else score.low,
            window_start=t.window_start,
            window_end=t.window_end,
            detail=score.detail[:1024],
        )
        payload = encode(alert)
        episode = {
            "fleet_id": fleet_id,
            "device_id": device_id,
            "model_name": name,
            "model_version": version,
            "kind": t.kind,
            "episode": t.episode,
            "state": t.state,
            "alert_msg_id": alert.msg_id,
            "payload": payload,
            "published": False,
            "created_at": alert.ts,
        }
        inserted = conn.execute(self.store.insert(DriftEpisodeRow).on_conflict_do_nothing(), episode).rowcount
        if not inserted:
            log.warning("drift alert already recorded, not repeated key=%s kind=%s episode=%d", key, t.kind, t.episode)
            return
        conn.execute(
            self.store.insert(SeenMessage).on_conflict_do_nothing(), {"msg_id": alert.msg_id, "received_at": alert.ts}
        )
        conn.execute(
            self.store.insert(AlertRow).on_conflict_do_nothing(),
            {
                "msg_id": alert.msg_id,
                "fleet_id": fleet_id,
                "device_id": device_id,
                "alert_id": alert.alert_id,
                "kind": alert.kind,
                "state": alert.state,
                "model_version": version,
                "score": alert.score,
                "threshold": alert.threshold,
                "detail": alert.detail,
                "ts": alert.ts,
            },
        )
        self.store.stats.alerts += 1
        self.alerts.append(PendingAlert(alert, payload))
        self.lines.append(alert_line(alert))
        log.warning(
            "drift alert %s kind=%s fleet=%s device=%s model=%s version=%s episode=%d score=%.4f threshold=%.4f %s",
            t.state,
            t.kind,
            *key,
            t.episode,
            alert.score,
            alert.threshold,
            alert.detail,
        )
