"""Configurations of both programs as tests write them: one dict form, built in code or written as TOML.

The dict form is what `common.config.from_dict` takes (what TOML gives: top-level keys and tables,
Path values allowed). `edge_tables` holds what the edge tests share (a local broker, fast reconnects,
one device), and `tests.edge_harness.edge_config` builds an EdgeConfig from it in-process; a test that
runs a program as a process writes the same dict as a file with `write_toml` instead (or
`write_edge_config` / `write_bridge_config`), so both go through the same loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Shared with bench/ scripts, which write the programs' configs the same way.
from devservers.programs import toml_text, write_bridge_config, write_toml

__all__ = ["edge_tables", "toml_text", "write_bridge_config", "write_edge_config", "write_toml"]


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
