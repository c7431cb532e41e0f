"""Drift state in the shared registry database, evaluated inside the ingest transaction.

Why the database: bridges share the telemetry subscription (`$share/...`), so one device's windows
are dealt to whichever bridge is free, and no single bridge sees a device's whole stream. Rather
than partitioning devices over bridges (which needs coordination and breaks when a bridge dies),
every piece of drift state lives in the registry database that all bridges already share:

* `drift_states`: one row per (device, model version) holding the frozen baseline, the windows it
  is scored on (all of them until the baseline is frozen, then the newest `recent_windows`), each
  kind's hysteresis counters, episode number and cool-down, and the newest window evaluated;
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

The cost stays off the per-message path: nothing happens for messages other than telemetry, and a
batch with telemetry adds two statements (read and lock, write back) for all its devices together
(each statement is a thread hop with aiosqlite), plus three per alert.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from sqlalchemy import JSON, bindparam, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from cloud_bridge.drift.scoring import (
    Baseline,
    DriftSettings,
    Kind,
    KindState,
    Pool,
    Transition,
    WindowStats,
    baseline_complete,
    complete_baseline,
    pool,
    pool_from_json,
    pool_to_json,
    reference_baseline,
    score_all,
    step,
    window_from_json,
    window_to_json,
)
from cloud_bridge.errors import ReferenceModelError
from cloud_bridge.registry import (
    AlertRow,
    Batch,
    DriftEpisodeRow,
    DriftStateRow,
    ModelRow,
    SeenMessage,
    TelemetryRow,
)
from cloud_bridge.tsdb.lines import alert_line, drift_line_for, drift_tags
from schemas import Alert, ModelRef, encode, new_msg_id

log = logging.getLogger(__name__)

Key = tuple[str, str, str, str]  # fleet, device, model name, model version
_SCORE_LIMIT = 1e12  # alerts carry finite numbers only (JSON has no infinity)
# About 2 KB each with 64 pooled features: ~40 MB for the recent windows of a few thousand devices.
_CODEC_CACHE = 20_000


def load_reference_mixes(paths: Iterable[str]) -> dict[str, dict[str, float]]:
    """sha256 -> reference class mix of every .onnx file given (or inside a given directory)."""
    import onnxruntime as ort

    mixes: dict[str, dict[str, float]] = {}
    for entry in paths:
        base = Path(entry)
        files = sorted(base.glob("*.onnx")) if base.is_dir() else [base]
        for file in files:
            if not file.is_file():
                raise ReferenceModelError(f"[drift] reference_models: {file} does not exist; point it at .onnx files")
            try:
                meta = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"]).get_modelmeta()
                mix = json.loads(meta.custom_metadata_map["reference_class_mix"])
            except KeyError:
                log.warning("model has no reference_class_mix metadata, skipped path=%s", file)
                continue
            except Exception as exc:  # ORT raises several unrelated types for a bad file
                raise ReferenceModelError(f"[drift] reference_models: cannot read {file}: {exc}") from exc
            mixes[hashlib.sha256(file.read_bytes()).hexdigest()] = {str(k): float(v) for k, v in mix.items()}
    return mixes


@dataclass(frozen=True)
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


class WindowCodec:
    """The JSON text of a device's stored windows, with each window's decoded form and its JSON text
    cached: a window never changes, yet it is read and rewritten with every later batch of its device
    while it is among the newest, and decoding its features each time would dominate drift's cost."""

    def __init__(self, capacity: int = _CODEC_CACHE) -> None:
        self._capacity = capacity
        self._by_text: OrderedDict[str, WindowStats] = OrderedDict()
        self._text_of: dict[int, str] = {}
        self._baselines: OrderedDict[str, Pool] = OrderedDict()

    def decode(self, text: str) -> list[WindowStats]:
        if not text or text == "[]":
            return []
        out: list[WindowStats] = []
        # One JSON object per line inside the array: split without parsing what is cached.
        for item in text[2:-2].split("},\n{"):
            fragment = "{" + item + "}"
            window = self._by_text.get(fragment)
            if window is None:
                d = json.loads(fragment)
                window = window_from_json(d["start"], d["end"], d["count"], d)
                self._remember(fragment, window)
            else:
                self._by_text.move_to_end(fragment)
            out.append(window)
        return out

    def encode(self, windows: list[WindowStats]) -> str:
        fragments = []
        for w in windows:
            fragment = self._text_of.get(id(w))
            if fragment is None or self._by_text.get(fragment) is not w:
                row = {"start": w.window_start, "end": w.window_end, "count": w.count, **window_to_json(w)}
                fragment = orjson.dumps(row).decode()
                self._remember(fragment, w)
            fragments.append(fragment)
        return "[" + ",\n".join(fragments) + "]" if fragments else "[]"

    def baseline(self, text: str) -> Pool:
        """A stored baseline (frozen: the same text for the life of a model version), decoded once."""
        pooled = self._baselines.get(text)
        if pooled is None:
            pooled = pool_from_json(json.loads(text))
            self._baselines[text] = pooled
            while len(self._baselines) > self._capacity // 4:
                self._baselines.popitem(last=False)
        else:
            self._baselines.move_to_end(text)
        return pooled

    def _remember(self, fragment: str, window: WindowStats) -> None:
        replaced = self._by_text.get(fragment)
        if replaced is not None and replaced is not window:
            self._text_of.pop(id(replaced), None)
        self._by_text[fragment] = window
        self._text_of[id(window)] = fragment
        while len(self._by_text) > self._capacity:
            _, old = self._by_text.popitem(last=False)
            self._text_of.pop(id(old), None)


class DriftStore:
    """Builds a `DriftRun` for each ingest batch that carries telemetry."""

    def __init__(self, settings: DriftSettings, dialect: str, references: Mapping[str, Mapping[str, float]]) -> None:
        self.settings = settings
        self.dialect = dialect
        self.references = dict(references)
        self.stats = DriftStats()
        self.codec = WindowCodec()

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
                stats = WindowStats.from_body(body)
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
class _KeyState:
    """One device's drift state as read under its lock, advanced in memory, then written back."""

    sha256: str
    source: str
    class_mix: dict[str, float] | None
    class_samples: int
    baseline_text: str | None
    windows: list[WindowStats]
    kinds: dict[Kind, KindState]
    last_window_end: float
    baseline: Baseline | None = None


@dataclass
class DriftRun:
    """Drift evaluation of one batch; `lines` and `alerts` are valid once the batch committed."""

    store: DriftStore
    windows: list[NewWindow]
    lines: list[str] = field(default_factory=list)
    alerts: list[PendingAlert] = field(default_factory=list)

    def apply(self, conn: Connection) -> None:
        # A retried commit runs this again on a fresh transaction: start from nothing. One statement
        # reads and one writes the state of every device in the batch (a statement is a thread hop
        # with aiosqlite), whatever the number of devices.
        self.lines, self.alerts = [], []
        by_key: dict[Key, list[NewWindow]] = {}
        for w in self.windows:
            by_key.setdefault(w.key, []).append(w)
        states = self._lock(conn, {k: v[0].sha256 for k, v in by_key.items()})
        evaluated: dict[Key, _KeyState] = {}
        transitions: list[tuple[Key, Transition]] = []
        for key in sorted(by_key):
            st = states[key]
            try:
                found = self._score(key, st, by_key[key])
            except (ValueError, TypeError, KeyError, ArithmeticError) as exc:
                # Bad numbers in one device's telemetry must not stop ingestion (the messages are stored).
                self.store.stats.errors += 1
                log.error("drift evaluation failed fleet=%s device=%s model=%s version=%s error=%r", *key, exc)
                continue
            evaluated[key] = st
            transitions.extend((key, t) for t in found)
        self._save(conn, evaluated)
        for key, transition in transitions:
            self._alert(conn, key, states[key].sha256, transition)
        self.store.stats.windows += len(self.windows)

    # ---- reads ------------------------------------------------------------------------------------
    def _lock(self, conn: Connection, shas: dict[Key, str]) -> dict[Key, _KeyState]:
        found = self._select(conn, sorted(shas))
        missing = sorted(k for k in shas if k not in found)
        if missing:
            mixes = self._reference_mixes(conn, {shas[k] for k in missing})
            now = time.time()
            conn.execute(
                self.store.insert(DriftStateRow).on_conflict_do_nothing(),
                [_new_state(k, shas[k], mixes.get(shas[k]), now) for k in missing],
            )
            # Another bridge may have inserted some first: read (and lock) whichever rows won.
            found.update(self._select(conn, missing))
        return found

    def _select(self, conn: Connection, keys: list[Key]) -> dict[Key, _KeyState]:
        t = DriftStateRow
        query = (
            select(
                *_key_columns(t),
                t.model_sha256,
                t.source,
                t.class_mix,
                t.class_samples,
                t.baseline,
                t.windows,
                t.kinds,
                t.last_window_end,
            )
            .where(_keys_in(t, keys))
            # Key order: bridges lock the rows they share in the same order, so they cannot deadlock.
            .order_by(*_key_columns(t))
            .with_for_update()
        )
        out: dict[Key, _KeyState] = {}
        for r in conn.execute(query):
            st = _KeyState(
                sha256=r.model_sha256,
                source=r.source,
                class_mix=r.class_mix,
                class_samples=r.class_samples,
                baseline_text=r.baseline,
                windows=self.store.codec.decode(r.windows),
                kinds={kind: KindState(**values) for kind, values in (r.kinds or {}).items()},
                last_window_end=r.last_window_end,
            )
            st.baseline = _baseline_of(st, self.store.codec)
            out[(r[0], r[1], r[2], r[3])] = st
        return out

    def _reference_mixes(self, conn: Connection, shas: set[str]) -> dict[str, dict[str, float]]:
        mixes = {sha: dict(self.store.references[sha]) for sha in shas if sha in self.store.references}
        unknown = sorted(shas - set(mixes))
        if unknown:
            query = select(ModelRow.sha256, ModelRow.reference_mix).where(ModelRow.sha256.in_(unknown))
            mixes.update({sha: dict(mix) for sha, mix in conn.execute(query) if mix})
        return mixes

    # ---- pure part --------------------------------------------------------------------------------
    def _score(self, key: Key, st: _KeyState, new: list[NewWindow]) -> list[Transition]:
        s = self.store.settings
        transitions: list[Transition] = []
        for w in sorted(new, key=lambda n: n.stats.window_end):
            bisect.insort(st.windows, w.stats, key=lambda x: x.window_end)
            if w.stats.window_end < st.last_window_end:
                # A late redelivery joins the pool it belongs to but is not scored: hysteresis only
                # moves forward in window time.
                self.store.stats.late_windows += 1
            else:
                st.last_window_end = w.stats.window_end
                if (st.baseline is None or not st.baseline.ready) and baseline_complete(s, st.windows):
                    st.baseline = complete_baseline(st.baseline, st.windows)
                    log.info(
                        "drift baseline frozen fleet=%s device=%s model=%s version=%s windows=%d",
                        *key,
                        len(st.windows),
                    )
                if st.baseline is not None:
                    transitions.extend(self._evaluate(key, st, pool(st.windows[-s.recent_windows :])))
            if st.baseline is not None and st.baseline.ready:
                del st.windows[: max(0, len(st.windows) - s.recent_windows)]
        return transitions

    def _evaluate(self, key: Key, st: _KeyState, recent: Pool) -> list[Transition]:
        assert st.baseline is not None
        out: list[Transition] = []
        self.store.stats.evaluations += 1
        tags = drift_tags(*key)
        for score in score_all(self.store.settings, st.baseline, recent):
            kind_state = st.kinds.setdefault(score.kind, KindState())
            transition = step(self.store.settings, kind_state, score, recent)
            threshold = score.low if kind_state.firing else score.high
            self.lines.append(
                drift_line_for(tags, score.kind, _finite(score.score), threshold, kind_state.firing, recent.window_end)
            )
            if transition is not None:
                out.append(transition)
        return out

    # ---- writes -----------------------------------------------------------------------------------
    def _save(self, conn: Connection, evaluated: dict[Key, _KeyState]) -> None:
        if not evaluated:
            return
        t = DriftStateRow
        stmt = (
            update(t)
            .where(*_key_params(t))
            .values(
                source=bindparam("v_source"),
                class_mix=bindparam("v_mix", type_=JSON),
                class_samples=bindparam("v_samples"),
                baseline=bindparam("v_baseline"),
                windows=bindparam("v_windows"),
                kinds=bindparam("v_kinds", type_=JSON),
                last_window_end=bindparam("v_last"),
                updated_at=bindparam("v_now"),
            )
        )
        now = time.time()
        conn.execute(stmt, [_state_values(k, st, now, self.store.codec) for k, st in evaluated.items()])

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
            score=_finite(score.score),
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


def _key_columns(table: Any) -> tuple[Any, Any, Any, Any]:
    return (table.fleet_id, table.device_id, table.model_name, table.model_version)


def _keys_in(table: Any, keys: list[Key]) -> Any:
    return tuple_(*_key_columns(table)).in_(keys)


def _key_params(table: Any) -> tuple[Any, ...]:
    return tuple(col == bindparam(f"k_{i}") for i, col in enumerate(_key_columns(table)))


def _key_binds(key: Key) -> dict[str, str]:
    return {f"k_{i}": part for i, part in enumerate(key)}


def _new_state(key: Key, sha256: str, mix: Mapping[str, float] | None, now: float) -> dict[str, Any]:
    return {
        "fleet_id": key[0],
        "device_id": key[1],
        "model_name": key[2],
        "model_version": key[3],
        "model_sha256": sha256,
        "source": "reference" if mix else "windows",
        "class_mix": dict(mix) if mix else None,
        "class_samples": 0,
        "baseline": None,
        "windows": "[]",
        "kinds": {},
        "last_window_end": 0.0,
        "created_at": now,
        "updated_at": now,
    }


def _baseline_of(st: _KeyState, codec: WindowCodec) -> Baseline | None:
    if st.baseline_text is not None:
        source: Literal["reference", "windows"] = "reference" if st.source == "reference" else "windows"
        return Baseline(source, dict(st.class_mix or {}), st.class_samples, codec.baseline(st.baseline_text))
    if st.source == "reference" and st.class_mix:
        return reference_baseline(st.class_mix)
    return None


def _state_values(key: Key, st: _KeyState, now: float, codec: WindowCodec) -> dict[str, Any]:
    base = st.baseline
    ready = base is not None and base.stats is not None
    if ready and st.baseline_text is None:
        assert base is not None and base.stats is not None
        st.baseline_text = json.dumps(pool_to_json(base.stats), separators=(",", ":"))
    # vars(): KindState holds only numbers and bools, so no deep copy (dataclasses.asdict) is needed.
    kinds = {kind: {**vars(ks), "score": _finite(ks.score)} for kind, ks in sorted(st.kinds.items())}
    return {
        **_key_binds(key),
        "v_source": base.source if base is not None else st.source,
        "v_mix": base.class_mix if base is not None else st.class_mix,
        "v_samples": base.class_samples if base is not None else st.class_samples,
        "v_baseline": st.baseline_text,
        "v_windows": codec.encode(st.windows),
        "v_kinds": kinds,
        "v_last": st.last_window_end,
        "v_now": now,
    }


def _finite(value: float) -> float:
    if math.isnan(value):
        return 0.0
    return max(-_SCORE_LIMIT, min(_SCORE_LIMIT, value))
