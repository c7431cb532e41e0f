"""The `drift_states` rows (one per device and model version) and their `drift_windows`, read and
locked, then written back, inside the ingest batch's transaction (cloud_bridge/drift/store.py says why).

`lock` locks the state row of every key a batch has windows for in one statement (`SELECT ... FOR
UPDATE` on PostgreSQL, in key order so bridges cannot deadlock), creating the missing ones first. It
reads only each row's `version`: a random token written with every change. A bridge keeps the state
it last wrote for each key (`StateCache`, bounded); when the token matches, nobody else changed the
row since, and neither the row's baseline nor its windows are read again. Otherwise (another bridge
scored the device last, or this bridge restarted) the row and its windows are read in two more
statements for all such keys together.

Windows are rows of their own (`drift_windows`): each is written once, when it arrives, and deleted
once it leaves the recent pool, so scoring a window writes about one window's bytes instead of the
whole pool's. `save` writes the new windows, the deletions and the state rows in one executemany
each. Rows made before `drift_windows` existed hold their windows as JSON text in
`drift_states.windows`; they are read from there once and moved.
"""

from __future__ import annotations

import json
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from sqlalchemy import JSON, bindparam, delete, select, tuple_, update
from sqlalchemy.engine import Connection

from cloud_bridge.drift.codec import WindowCodec, finite, pack_window, pool_to_json, unpack_window
from cloud_bridge.drift.scoring import Baseline, Kind, KindState, reference_baseline
from cloud_bridge.drift.windows import WindowStats
from cloud_bridge.registry import DriftStateRow, DriftWindowRow, ModelRow

Key = tuple[str, str, str, str]  # fleet, device, model name, model version

# Cached states: ~6 windows each (a few KB with 64 features): about 60 MB for 10,000 devices.
_CACHE_KEYS = 12_000


@dataclass
class KeyState:
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
    token: int | None = None  # drift_states.version as read (None: never written with one)
    # Windows to write to drift_windows at save (msg_id, window), and whether older ones left the pool.
    added: list[tuple[str, WindowStats]] = field(default_factory=list)
    dropped: bool = False
    rewrite: bool = False  # the baseline columns changed (or the row moves off its JSON windows)
    tags: tuple[str, str] | None = None  # the key's escaped TSDB tags (tsdb.lines.drift_tags), made once


class StateCache:
    """The state this bridge last wrote per key, with the token it wrote (least recently used out)."""

    def __init__(self, capacity: int = _CACHE_KEYS) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Key, KeyState] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def take(self, key: Key, token: int | None) -> KeyState | None:
        """The cached state if the row still carries its token; taken out either way (a state being
        advanced must not be found by a retried transaction: it comes back with `put` after saving)."""
        st = self._items.pop(key, None)
        if st is None or token is None or st.token != token:
            self.misses += 1
            return None
        self.hits += 1
        return st

    def put(self, key: Key, st: KeyState) -> None:
        self._items[key] = st
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class StateRows:
    """Reads, locks, creates and writes `drift_states` and `drift_windows` rows; `insert` is the
    dialect's INSERT (for ON CONFLICT), `references` the known models' reference class mixes by sha256."""

    def __init__(
        self,
        insert: Callable[[Any], Any],
        codec: WindowCodec,
        references: Mapping[str, Mapping[str, float]],
        cache: StateCache | None = None,
    ) -> None:
        self._insert = insert
        self._codec = codec
        self._references = references
        self.cache = cache if cache is not None else StateCache()

    def lock(self, conn: Connection, shas: dict[Key, str]) -> dict[Key, KeyState]:
        """The state of every key in `shas` (key -> model sha256), locked; missing rows are created."""
        keys = sorted(shas)
        tokens = self._tokens(conn, keys)
        found: dict[Key, KeyState] = {}
        stale: list[Key] = []
        for key, token in tokens.items():
            st = self.cache.take(key, token)
            if st is None:
                stale.append(key)
            else:
                found[key] = st
        missing = [k for k in keys if k not in tokens]
        if missing:
            mixes = self._reference_mixes(conn, {shas[k] for k in missing})
            now = time.time()
            conn.execute(
                self._insert(DriftStateRow).on_conflict_do_nothing(),
                [_new_state(k, shas[k], mixes.get(shas[k]), now) for k in missing],
            )
            # Another bridge may have inserted some first: read (and lock) whichever rows won.
            stale = sorted(stale + missing)
        if stale:
            found.update(self._select(conn, stale))
        return found

    def _tokens(self, conn: Connection, keys: list[Key]) -> dict[Key, int | None]:
        t = DriftStateRow
        query = (
            select(*_key_columns(t), t.version)
            .where(_keys_in(t, keys))
            # Key order: bridges lock the rows they share in the same order, so they cannot deadlock.
            .order_by(*_key_columns(t))
            .with_for_update()
        )
        return {(r[0], r[1], r[2], r[3]): r[4] for r in conn.execute(query)}

    def _select(self, conn: Connection, keys: list[Key]) -> dict[Key, KeyState]:
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
                t.version,
            )
            .where(_keys_in(t, keys))
            .order_by(*_key_columns(t))
            .with_for_update()
        )
        out: dict[Key, KeyState] = {}
        for r in conn.execute(query):
            legacy = self._codec.decode(r.windows)
            st = KeyState(
                sha256=r.model_sha256,
                source=r.source,
                class_mix=r.class_mix,
                class_samples=r.class_samples,
                baseline_text=r.baseline,
                windows=legacy,
                kinds={kind: KindState(**values) for kind, values in (r.kinds or {}).items()},
                last_window_end=r.last_window_end,
                token=r.version,
            )
            if legacy:
                # Made before drift_windows: move the windows there with this batch's save.
                st.added = [(f"legacy-{i}", w) for i, w in enumerate(legacy)]
                st.rewrite = True
            st.baseline = _baseline_of(st, self._codec)
            out[(r[0], r[1], r[2], r[3])] = st
        w = DriftWindowRow
        rows = conn.execute(
            select(*_key_columns(w), w.window_start, w.window_end, w.count, w.stats)
            .where(_keys_in(w, keys))
            .order_by(*_key_columns(w), w.window_end, w.msg_id)
        )
        for r in rows:
            owner = out.get((r[0], r[1], r[2], r[3]))
            if owner is not None:  # r[6]: Row.count is a method
                owner.windows.append(unpack_window(r.window_start, r.window_end, r[6], r.stats))
        for owner in out.values():
            if owner.added:  # legacy and stored windows together: keep them in window order
                owner.windows.sort(key=lambda x: x.window_end)
        return out

    def _reference_mixes(self, conn: Connection, shas: set[str]) -> dict[str, dict[str, float]]:
        mixes = {sha: dict(self._references[sha]) for sha in shas if sha in self._references}
        unknown = sorted(shas - set(mixes))
        if unknown:
            query = select(ModelRow.sha256, ModelRow.reference_mix).where(ModelRow.sha256.in_(unknown))
            mixes.update({sha: dict(mix) for sha, mix in conn.execute(query) if mix})
        return mixes

    def save(self, conn: Connection, evaluated: dict[Key, KeyState]) -> None:
        """Write back every evaluated key: new windows, windows that left the pool, the state rows
        (one executemany each), then remember each state with its new token."""
        if not evaluated:
            return
        now = time.time()
        windows: list[dict[str, Any]] = []
        dropped: list[dict[str, Any]] = []
        light: list[dict[str, Any]] = []
        full: list[dict[str, Any]] = []
        for key, st in evaluated.items():
            if st.added:
                kept = {id(w) for w in st.windows}
                windows.extend(_window_values(key, msg_id, w) for msg_id, w in st.added if id(w) in kept)
            if st.dropped and st.windows:
                dropped.append({**_key_binds(key), "cutoff": st.windows[0].window_end})
            st.token = random.getrandbits(62)
            values = _state_values(key, st, now, self._codec)
            (full if st.rewrite else light).append(values)
        if conn.dialect.name == "sqlite":
            _save_sqlite(conn, windows, dropped, light)
            light = []
        else:
            if windows:
                conn.execute(self._insert(DriftWindowRow).on_conflict_do_nothing(), windows)
            if dropped:
                w = DriftWindowRow
                conn.execute(delete(w).where(*_key_params(w), w.window_end < bindparam("cutoff")), dropped)
        t = DriftStateRow
        common = {
            "kinds": bindparam("v_kinds", type_=JSON),
            "last_window_end": bindparam("v_last"),
            "version": bindparam("v_token"),
            "updated_at": bindparam("v_now"),
        }
        if light:
            conn.execute(update(t).where(*_key_params(t)).values(**common), light)
        if full:
            stmt = update(t).where(*_key_params(t))
            conn.execute(
                stmt.values(
                    **common,
                    source=bindparam("v_source"),
                    class_mix=bindparam("v_mix", type_=JSON),
                    class_samples=bindparam("v_samples"),
                    baseline=bindparam("v_baseline"),
                    windows="[]",
                ),
                full,
            )
        for key, st in evaluated.items():
            st.added, st.dropped, st.rewrite = [], False, False
            self.cache.put(key, st)


_KEY_WHERE = "fleet_id = ? AND device_id = ? AND model_name = ? AND model_version = ?"
_WINDOW_COLUMNS = (
    "fleet_id",
    "device_id",
    "model_name",
    "model_version",
    "window_end",
    "msg_id",
    "window_start",
    "count",
    "stats",
)
_QUOTED_WINDOW_COLUMNS = ", ".join(f'"{c}"' for c in _WINDOW_COLUMNS)
_SQLITE_INSERT_WINDOWS = (
    f"INSERT INTO drift_windows ({_QUOTED_WINDOW_COLUMNS}) "
    f"VALUES ({', '.join('?' * len(_WINDOW_COLUMNS))}) ON CONFLICT DO NOTHING"
)
_SQLITE_DELETE_WINDOWS = f"DELETE FROM drift_windows WHERE {_KEY_WHERE} AND window_end < ?"
_SQLITE_UPDATE_STATES = (
    f"UPDATE drift_states SET kinds = ?, last_window_end = ?, version = ?, updated_at = ? WHERE {_KEY_WHERE}"
)


def _save_sqlite(
    conn: Connection, windows: list[dict[str, Any]], dropped: list[dict[str, Any]], light: list[dict[str, Any]]
) -> None:
    """`save`'s three executemany through the driver: SQLAlchemy's parameter building cost more per
    row than SQLite takes to write it (the same trade as Registry._insert_sqlite)."""
    if windows:
        conn.exec_driver_sql(_SQLITE_INSERT_WINDOWS, [tuple(w[c] for c in _WINDOW_COLUMNS) for w in windows])
    if dropped:
        conn.exec_driver_sql(
            _SQLITE_DELETE_WINDOWS, [(d["k_0"], d["k_1"], d["k_2"], d["k_3"], d["cutoff"]) for d in dropped]
        )
    if light:
        conn.exec_driver_sql(
            _SQLITE_UPDATE_STATES,
            [
                (orjson.dumps(v["v_kinds"]).decode(), v["v_last"], v["v_token"], v["v_now"], *_key_tuple(v))
                for v in light
            ],
        )


def _key_tuple(values: Mapping[str, Any]) -> tuple[str, str, str, str]:
    return (values["k_0"], values["k_1"], values["k_2"], values["k_3"])


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


def _baseline_of(st: KeyState, codec: WindowCodec) -> Baseline | None:
    if st.baseline_text is not None:
        source: Literal["reference", "windows"] = "reference" if st.source == "reference" else "windows"
        return Baseline(source, dict(st.class_mix or {}), st.class_samples, codec.baseline(st.baseline_text))
    if st.source == "reference" and st.class_mix:
        return reference_baseline(st.class_mix)
    return None


def _state_values(key: Key, st: KeyState, now: float, codec: WindowCodec) -> dict[str, Any]:
    base = st.baseline
    ready = base is not None and base.stats is not None
    if ready and st.baseline_text is None:
        assert base is not None and base.stats is not None
        st.baseline_text = json.dumps(pool_to_json(base.stats), separators=(",", ":"))
        st.rewrite = True
    # vars(): KindState holds only numbers and bools, so no deep copy (dataclasses.asdict) is needed.
    kinds = {kind: {**vars(ks), "score": finite(ks.score)} for kind, ks in sorted(st.kinds.items())}
    values: dict[str, Any] = {**_key_binds(key), "v_kinds": kinds, "v_last": st.last_window_end}
    values["v_token"], values["v_now"] = st.token, now
    if st.rewrite:
        values["v_source"] = base.source if base is not None else st.source
        values["v_mix"] = base.class_mix if base is not None else st.class_mix
        values["v_samples"] = base.class_samples if base is not None else st.class_samples
        values["v_baseline"] = st.baseline_text
    return values


def _window_values(key: Key, msg_id: str, w: WindowStats) -> dict[str, Any]:
    return {
        "fleet_id": key[0],
        "device_id": key[1],
        "model_name": key[2],
        "model_version": key[3],
        "window_end": w.window_end,
        "msg_id": msg_id,
        "window_start": w.window_start,
        "count": w.count,
        "stats": pack_window(w),
    }
