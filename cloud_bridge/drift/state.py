"""The `drift_states` rows: one per (device, model version), read and locked, then written back, inside
the ingest batch's transaction (cloud_bridge/drift/store.py says why there).

`lock` reads the rows of every key a batch has windows for in one statement (`SELECT ... FOR UPDATE`
on PostgreSQL, in key order so bridges cannot deadlock), creating the missing ones first; `save`
writes back every evaluated one in one executemany: two thread hops with aiosqlite, whatever the
number of devices.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import JSON, bindparam, select, tuple_, update
from sqlalchemy.engine import Connection

from cloud_bridge.drift.codec import WindowCodec, finite, pool_to_json
from cloud_bridge.drift.scoring import Baseline, Kind, KindState, reference_baseline
from cloud_bridge.drift.windows import WindowStats
from cloud_bridge.registry import DriftStateRow, ModelRow

Key = tuple[str, str, str, str]  # fleet, device, model name, model version


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


class StateRows:
    """Reads, locks, creates and writes `drift_states` rows; `insert` is the dialect's INSERT (for
    ON CONFLICT), `references` the known models' reference class mixes by sha256."""

    def __init__(
        self, insert: Callable[[Any], Any], codec: WindowCodec, references: Mapping[str, Mapping[str, float]]
    ) -> None:
        self._insert = insert
        self._codec = codec
        self._references = references

    def lock(self, conn: Connection, shas: dict[Key, str]) -> dict[Key, KeyState]:
        """The state of every key in `shas` (key -> model sha256), locked; missing rows are created."""
        found = self._select(conn, sorted(shas))
        missing = sorted(k for k in shas if k not in found)
        if missing:
            mixes = self._reference_mixes(conn, {shas[k] for k in missing})
            now = time.time()
            conn.execute(
                self._insert(DriftStateRow).on_conflict_do_nothing(),
                [_new_state(k, shas[k], mixes.get(shas[k]), now) for k in missing],
            )
            # Another bridge may have inserted some first: read (and lock) whichever rows won.
            found.update(self._select(conn, missing))
        return found

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
            )
            .where(_keys_in(t, keys))
            # Key order: bridges lock the rows they share in the same order, so they cannot deadlock.
            .order_by(*_key_columns(t))
            .with_for_update()
        )
        out: dict[Key, KeyState] = {}
        for r in conn.execute(query):
            st = KeyState(
                sha256=r.model_sha256,
                source=r.source,
                class_mix=r.class_mix,
                class_samples=r.class_samples,
                baseline_text=r.baseline,
                windows=self._codec.decode(r.windows),
                kinds={kind: KindState(**values) for kind, values in (r.kinds or {}).items()},
                last_window_end=r.last_window_end,
            )
            st.baseline = _baseline_of(st, self._codec)
            out[(r[0], r[1], r[2], r[3])] = st
        return out

    def _reference_mixes(self, conn: Connection, shas: set[str]) -> dict[str, dict[str, float]]:
        mixes = {sha: dict(self._references[sha]) for sha in shas if sha in self._references}
        unknown = sorted(shas - set(mixes))
        if unknown:
            query = select(ModelRow.sha256, ModelRow.reference_mix).where(ModelRow.sha256.in_(unknown))
            mixes.update({sha: dict(mix) for sha, mix in conn.execute(query) if mix})
        return mixes

    def save(self, conn: Connection, evaluated: dict[Key, KeyState]) -> None:
        """Write back the state of every evaluated key (one statement)."""
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
        conn.execute(stmt, [_state_values(k, st, now, self._codec) for k, st in evaluated.items()])


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
    # vars(): KindState holds only numbers and bools, so no deep copy (dataclasses.asdict) is needed.
    kinds = {kind: {**vars(ks), "score": finite(ks.score)} for kind, ks in sorted(st.kinds.items())}
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
