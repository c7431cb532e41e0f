"""Configurations of both programs as tests write them: one dict form, built in code or written as TOML.

The dict form is what `common.config.from_dict` takes (what TOML gives: top-level keys and tables,
Path values allowed). `edge_tables` holds what the edge tests share (a local broker, fast reconnects,
one device), and `tests.edge_harness.edge_config` builds an EdgeConfig from it in-process; a test that
runs a program as a process writes the same dict as a file with `write_toml` instead (or
`write_edge_config` / `write_bridge_config`), so both go through the same loader.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from devservers import Mosquitto

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def edge_tables(tmp_path: Path, port: int, model: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """The edge config the tests share, each section updated with `sections` (a new one added)."""
    values: dict[str, Any] = {
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "keepalive": 5},
        "device": {"fleet_id": "f1", "device_id": "dev-1"},
        "model": {"path": model},
        "outbox": {"path": tmp_path / "outbox.sqlite"},
        "telemetry": {"interval_s": 60.0, "idle_interval_s": 0.0},
        "source": {"kind": "mqtt"},
        # The tests count what each path does with every unsure input; the budgets that keep a
        # billed link cheap have tests of their own (test_budgets.py).
        "routing": {"max_escalations_per_minute": 100_000},
        "sampling": {"max_per_minute": 60},
        # Results reach a test's subscriber within a second (coalescing has its own tests).
        "uplink": {"results_max_delay_s": 1.0},
    }
    for name, overrides in sections.items():
        values.setdefault(name, {}).update(overrides)
    return values


def write_edge_config(tmp_path: Path, port: int, model: Path, **sections: dict[str, Any]) -> Path:
    """`edge_tables(...)` as tmp_path/edge.toml, for `edge-node run --config`."""
    return write_toml(tmp_path / "edge.toml", edge_tables(tmp_path, port, model, **sections))


def write_bridge_config(tmp_path: Path, broker: Mosquitto | None = None, **values: Any) -> Path:
    """tmp_path/cloud.toml for a `cloud-bridge` command: its state in tmp_path/state, [mqtt] on
    `broker` (when given), then `values` (top-level keys, or tables that update a section)."""
    tables: dict[str, Any] = {"state_dir": tmp_path / "state"}
    if broker is not None:
        tables["mqtt"] = {"host": broker.host, "port": broker.port}
    for name, value in values.items():
        if isinstance(value, Mapping) and isinstance(tables.get(name), dict):
            tables[name].update(value)
        else:
            tables[name] = value
    return write_toml(tmp_path / "cloud.toml", tables)


def write_toml(path: Path, tables: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml_text(tables), encoding="utf-8")
    return path


def toml_text(tables: Mapping[str, Any]) -> str:
    """TOML for the dict form: scalars (str, Path, bool, int, float, lists of them) as key = value,
    dicts as tables (nested ones as [a.b]); None is left out, which leaves a key at its default."""
    lines: list[str] = []
    _table(lines, (), tables)
    return "\n".join(lines) + "\n"


def _table(lines: list[str], name: tuple[str, ...], values: Mapping[str, Any]) -> None:
    scalars = {k: v for k, v in values.items() if v is not None and not isinstance(v, Mapping)}
    tables = {k: v for k, v in values.items() if isinstance(v, Mapping)}
    if name and (scalars or not tables):
        lines.append(f"[{'.'.join(_key(part) for part in name)}]")
    lines.extend(f"{_key(k)} = {_value(v)}" for k, v in scalars.items())
    for key, table in tables.items():
        _table(lines, (*name, key), table)


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):  # before int: a bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str | Path):
        return _string(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r} ({type(value).__name__})")


def _string(text: str) -> str:
    # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
