"""The `drift_states` rows (one per device and model version) and their `drift_windows`, read and
locked, then written back, inside the ingest batch's transaction (cloud_bridge/drift/store.py says why).

`lock` locks the state row of every key a batch has windows for in one statement (`SELECT ... FOR
UPDATE` on PostgreSQL, in key order so bridges cannot deadlock), creating the missing ones first. It
reads only each row's `version`: a random token written with every change. A bridge keeps the state
it last wrote for each key (`StateCache`, bounded); when the token matches, nobody else changed the
row since, and neither its baseline nor its windows are read again. Otherwise (another bridge
scored the device last, or this bridge restarted) the row, its baseline and its windows are read in
three more statements for all such keys together. With two bridges on `$share` a device's windows
alternate between them, so this is common (a third of the windows at 10,000 devices); where this
bridge still holds the state it wrote before, only what the other changed is read: the windows newer
than its newest (a window is written once and deleted once, so the older ones it holds are still
right or gone), and the baseline only if it had none frozen (a frozen baseline never changes).

Windows are rows of their own (`drift_windows`): each is written once, when it arrives, and deleted
once it leaves the recent pool, so scoring a window writes about one window's bytes instead of the
whole pool's. `save` writes the new windows, the deletions and the state rows in one executemany
each (as plain SQL to the driver, cloud_bridge/drift/driver_sql.py). Rows made before
`drift_windows` existed hold their windows as JSON text in `drift_states.windows`; they are read
from there once and moved.

The frozen baseline (~1.6 KB with 64 features) is a row of `drift_baselines`, written once: in the
state row, rewritten with every scored window, it made that row a database page of its own (on
SQLite ~10 us per window of updates and WAL). Rows made before keep it in `drift_states.baseline`,
read from there once and moved. (A bridge of an earlier version sharing the registry would not see
a baseline frozen by this one: upgrade all bridges together.)
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from sqlalchemy import JSON, bindparam, select, tuple_, update
from sqlalchemy.engine import Connection

from cloud_bridge.drift import driver_sql
from cloud_bridge.drift.codec import WindowCodec, pack_window, pool_to_json, unpack_window
from cloud_bridge.drift.scoring import Baseline, Kind, KindState, reference_baseline
from cloud_bridge.drift.windows import WindowStats
from cloud_bridge.registry import DriftBaselineRow, DriftStateRow, ModelRow

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
    kinds: dict[Kind, KindState]  # sorted by kind, as stored (JSON); each score finite
    last_window_end: float
    baseline: Baseline | None = None
    token: int | None = None  # drift_states.version as read (None: never written with one)
    # Windows to write to drift_windows at save (msg_id, window), and whether older ones left the pool.
    added: list[tuple[str, WindowStats]] = field(default_factory=list)
    dropped: bool = False
    rewrite: bool = False  # the baseline columns changed (or the row moves off its JSON windows)
    move_baseline: bool = False  # baseline_text goes to drift_baselines at save (just frozen, or moved)
    tags: tuple[str, str] | None = None  # the key's escaped TSDB tags (tsdb.lines.drift_tags), made once


class StateCache:
    """The state this bridge last wrote per key, with the token it wrote (least recently used out)."""

    def __init__(self, capacity: int = _CACHE_KEYS) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Key, KeyState] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.refreshed = 0  # misses where only the other bridge's changes were read

    def take(self, key: Key, token: int | None) -> tuple[KeyState | None, bool]:
        """The cached state, and whether the row still carries its token (else another bridge changed
        it since); taken out either way (a state being advanced must not be found by a retried
        transaction: it comes back with `put` after saving)."""
        st = self._items.pop(key, None)
        if st is None or token is None or st.token != token:
            self.misses += 1
            return st, False
        self.hits += 1
        return st, True

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
        held: dict[Key, KeyState] = {}  # states this bridge wrote that another bridge changed since
        for key, token in tokens.items():
            st, current = self.cache.take(key, token)
            if current and st is not None:
                found[key] = st
            else:
                stale.append(key)
                if st is not None:
                    held[key] = st
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
            found.update(self._select(conn, stale, held))
        return found

    def _tokens(self, conn: Connection, keys: list[Key]) -> dict[Key, int | None]:
        return driver_sql.tokens(conn, keys)

    def _select(self, conn: Connection, keys: list[Key], held: Mapping[Key, KeyState]) -> dict[Key, KeyState]:
        """Whole state rows with their windows and baselines (cache misses: another bridge wrote them,
        or a restart), reading only what changed where `held` has the state this bridge wrote before."""
        rows = self._state_rows(conn, keys)
        legacy = {(r[0], r[1], r[2], r[3]): self._codec.decode(r[9]) for r in rows}
        kept: dict[Key, KeyState] = {}  # held states whose windows and baseline are read only as changed
        for r in rows:
            key = (r[0], r[1], r[2], r[3])
            old = held.get(key)
            if old is not None and old.windows and old.sha256 == r[4] and r[8] is None and not legacy[key]:
                kept[key] = old
        pools = self._pools(conn, legacy, kept)
        # A baseline is frozen once and never changes: read only where none was frozen when held.
        unfrozen = [(r[0], r[1], r[2], r[3]) for r in rows if r[8] is None]
        frozen = self._baselines(conn, [k for k in unfrozen if k not in kept or kept[k].baseline_text is None])
        out: dict[Key, KeyState] = {}
        for r in rows:
            sha256, source, class_mix, class_samples, baseline, _, kinds, last_window_end, version = r[4:]
            key = (r[0], r[1], r[2], r[3])
            old = kept.get(key)
            if baseline is None:
                baseline = old.baseline_text if old is not None and old.baseline_text is not None else frozen.get(key)
            st = KeyState(
                sha256=sha256,
                source=source,
                class_mix=class_mix,
                class_samples=class_samples,
                baseline_text=baseline,
                windows=pools.get(key, []),
                # Sorted by kind, as they are stored (KeyState.kinds).
                kinds={kind: KindState(**values) for kind, values in sorted((kinds or {}).items())},
                last_window_end=last_window_end,
                token=version,
            )
            if legacy[key]:
                # Made before drift_windows: move the windows there with this batch's save.
                st.added = [(f"legacy-{i}", w) for i, w in enumerate(legacy[key])]
                st.windows = sorted(st.windows + legacy[key], key=lambda x: x.window_end)
                st.rewrite = True
            if r[8] is not None:  # made before drift_baselines: move it there with this batch's save
                st.rewrite = st.move_baseline = True
            if old is not None and _same_baseline(old, st):
                st.baseline = old.baseline  # a frozen baseline never changes: not parsed again
            else:
                st.baseline = _baseline_of(st, self._codec)
            out[key] = st
        return out

    def _state_rows(self, conn: Connection, keys: list[Key]) -> list[tuple[Any, ...]]:
        """(key..., *_STATE_COLUMNS) of these keys' state rows, JSON columns decoded."""
        if conn.dialect.name == "sqlite":
            return [
                (*r[:6], driver_sql.json_value(r[6]), *r[7:10], driver_sql.json_value(r[10]), *r[11:])
                for r in driver_sql.keyed_rows(conn, "drift_states", _STATE_COLUMNS, keys)
            ]
        t = DriftStateRow
        query = (
            select(*_key_columns(t), *(getattr(t, c) for c in _STATE_COLUMNS))
            .where(_keys_in(t, keys))
            .order_by(*_key_columns(t))
            .with_for_update()
        )
        return [tuple(r) for r in conn.execute(query)]

    def _pools(
        self, conn: Connection, keys: Mapping[Key, object], kept: Mapping[Key, KeyState]
    ) -> dict[Key, list[WindowStats]]:
        """The stored windows of `keys` in window order; for a `kept` key only those newer than the
        newest it holds are read whole, the others are its own (or gone: deleted by the other bridge).
        A held key that meets an older window it does not hold (a late one the other bridge stored) is
        read whole again."""
        cuts = [(key, kept[key].windows[-1].window_end if key in kept else -math.inf) for key in keys]
        pools: dict[Key, list[WindowStats]] = {}
        again: set[Key] = set()
        held: dict[Key, dict[tuple[float, float, int], WindowStats]] = {}
        for r in driver_sql.windows_after(conn, cuts):
            key = (r[0], r[1], r[2], r[3])
            if r[7] is not None:
                pools.setdefault(key, []).append(unpack_window(r[4], r[5], r[6], bytes(r[7])))
                continue
            mine = held.get(key)
            if mine is None:
                mine = held[key] = {(w.window_end, w.window_start, w.count): w for w in kept[key].windows}
            w = mine.get((r[5], r[4], r[6]))
            if w is None:
                again.add(key)
            else:
                pools.setdefault(key, []).append(w)
        if again:
            for key in again:
                pools.pop(key, None)
            for r in driver_sql.windows_after(conn, [(key, -math.inf) for key in sorted(again)]):
                pools.setdefault((r[0], r[1], r[2], r[3]), []).append(unpack_window(r[4], r[5], r[6], bytes(r[7])))
        self.cache.refreshed += len(kept) - len(again)
        return pools

    def _baselines(self, conn: Connection, keys: list[Key]) -> dict[Key, str]:
        """The frozen baselines of these keys (those that have one) from drift_baselines."""
        if not keys:
            return {}
        if conn.dialect.name == "sqlite":
            rows = driver_sql.keyed_rows(conn, "drift_baselines", ["baseline"], keys)
        else:
            b = DriftBaselineRow
            rows = [tuple(r) for r in conn.execute(select(*_key_columns(b), b.baseline).where(_keys_in(b, keys)))]
        return {(r[0], r[1], r[2], r[3]): r[4] for r in rows}

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
        windows: list[tuple[Any, ...]] = []
        dropped: list[tuple[str, str, str, str, float]] = []
        light: list[tuple[Any, ...]] = []  # kinds, last window end, token, now, key
        full: list[dict[str, Any]] = []
        token = random.getrandbits
        for key, st in evaluated.items():
            kept = st.windows
            if st.added:
                # Windows added and pushed out again in this batch are not written. The pool is in
                # window order and loses its oldest: a window newer than the oldest kept one stayed.
                oldest = kept[0].window_end if kept else math.inf
                for msg_id, w in st.added:
                    if w.window_end > oldest or any(x is w for x in kept):
                        windows.append((*key, w.window_end, msg_id, w.window_start, w.count, pack_window(w)))
            if st.dropped and kept:
                dropped.append((*key, kept[0].window_end))
            st.token = token(62)
            if _baseline_text(st) or st.rewrite:
                full.append(_state_values(key, st, now))
            else:
                # KindState is a dataclass: orjson writes its fields as an object, in declaration order.
                light.append((orjson.dumps(st.kinds).decode(), st.last_window_end, st.token, now, *key))
        driver_sql.save(conn, windows, dropped, light)
        baselines = [
            {**dict(zip(_KEY_NAMES, key, strict=True)), "baseline": st.baseline_text, "created_at": now}
            for key, st in evaluated.items()
            if st.move_baseline
        ]
        if baselines:
            # A key's baseline is written once (the state row is locked meanwhile); the upsert only
            # matters if a row was left behind, and then the state's own baseline wins.
            stmt = self._insert(DriftBaselineRow)
            conn.execute(
                stmt.on_conflict_do_update(index_elements=list(_KEY_NAMES), set_={"baseline": stmt.excluded.baseline}),
                baselines,
            )
        if full:
            t = DriftStateRow
            conn.execute(
                update(t)
                .where(*_key_params(t))
                .values(
                    kinds=bindparam("v_kinds", type_=JSON),
                    last_window_end=bindparam("v_last"),
                    version=bindparam("v_token"),
                    updated_at=bindparam("v_now"),
                    source=bindparam("v_source"),
                    class_mix=bindparam("v_mix", type_=JSON),
                    class_samples=bindparam("v_samples"),
                    baseline=bindparam("v_baseline"),
                    windows="[]",
                ),
                full,
            )
        for key, st in evaluated.items():
            st.added, st.dropped, st.rewrite, st.move_baseline = [], False, False, False
            self.cache.put(key, st)


_STATE_COLUMNS = (
    "model_sha256",
    "source",
    "class_mix",
    "class_samples",
    "baseline",
    "windows",
    "kinds",
    "last_window_end",
    "version",
)
_KEY_NAMES = ("fleet_id", "device_id", "model_name", "model_version")


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


def _same_baseline(old: KeyState, new: KeyState) -> bool:
    """Whether `new` (read from the row) has the frozen baseline `old` held, so its parse can be reused."""
    return (
        old.baseline is not None
        and old.baseline_text is not None
        and (old.baseline_text, old.source, old.class_mix, old.class_samples)
        == (new.baseline_text, new.source, new.class_mix, new.class_samples)
    )


def _baseline_text(st: KeyState) -> bool:
    """Whether the baseline froze since the row was last written (its text is made now, once)."""
    base = st.baseline
    if base is None or base.stats is None or st.baseline_text is not None:
        return False
    st.baseline_text = json.dumps(pool_to_json(base.stats), separators=(",", ":"))
    st.rewrite = st.move_baseline = True
    return True


def _state_values(key: Key, st: KeyState, now: float) -> dict[str, Any]:
    """The parameters of a state row rewritten with its baseline columns."""
    base = st.baseline
    return {
        **_key_binds(key),
        "v_kinds": st.kinds,  # KindState dataclasses: the JSON serializer (orjson) writes their fields
        "v_last": st.last_window_end,
        "v_token": st.token,
        "v_now": now,
        "v_source": base.source if base is not None else st.source,
        "v_mix": base.class_mix if base is not None else st.class_mix,
        "v_samples": base.class_samples if base is not None else st.class_samples,
        "v_baseline": None,  # in drift_baselines (a legacy row's text is moved there in the same save)
    }
