"""The project's own programs (edge-node, cloud-bridge) as child processes, and their config files,
for tests, bench/ scripts and the demo.

A config is written in the dict form `common.config.from_dict` takes (what TOML gives: top-level keys
and tables, Path values allowed) and rendered to TOML here, so a program started as a process reads it
through the same loader as a user's file. `start_program` runs `python -m MODULE ...` from a checkout
(its packages first on the path) with its output in a log file; the returned ManagedProcess stops it
with SIGTERM (the programs drain on it) and never outlives the caller.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from devservers._process import ManagedProcess
from devservers.mosquitto import Mosquitto

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
ROOT = Path(__file__).resolve().parents[1]


def start_program(module: str, args: list[str], log: Path, *, root: Path = ROOT) -> ManagedProcess:
    """`python -m module args...` run in checkout `root` (its packages, not an installed copy's),
    unbuffered, stdout and stderr appended to `log`."""
    process = ManagedProcess(module, log)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(root)}
    process.launch([sys.executable, "-m", module, *args], env=env, cwd=root)
    return process


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
