"""What several `cloud-bridge` commands share: the `--config` option, opening the registry, times, tables."""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeAlias

from cloud_bridge.config import BridgeConfig
from cloud_bridge.errors import ConfigError, UsageError
from cloud_bridge.registry import Registry

# What `add_subparsers` returns: the group each command module adds its parsers to (a string: the
# class is generic for type checkers only).
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Handler = Callable[[argparse.Namespace], int]


_UNITS_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIX = re.compile(r"^\d+(?:\.\d+)?$")


def parse_when(text: str, now: float) -> float:
    """A point in time as unix seconds: ISO 8601 (no zone = UTC), unix seconds, or an age like "2h"."""
    value = text.strip()
    if _UNIX.match(value):
        return float(value)
    ago = _AGO.match(value)
    if ago:
        return now - float(ago[1]) * _UNITS_S[ago[2]]
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(
            f"{text!r} is not a time: use ISO 8601 (2026-11-26T08:00:00Z), unix seconds (1795638016) "
            "or an age (90s, 30m, 2h, 7d, 2w)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def add_config(parser: argparse.ArgumentParser, uses: str, *, required: bool = True) -> None:
    """`--config FILE`: the bridge's TOML config, of which this command `uses` some sections.

    Required by every command that reads the config: without it a command would silently use the
    defaults (a registry in ./bridge-state, a broker on 127.0.0.1) and report on the wrong fleet.
    """
    parser.add_argument(
        "--config", type=Path, required=required, default=None, help=f"the bridge's TOML config file ({uses})"
    )


def command(parser: argparse.ArgumentParser, name: str, handler: Handler) -> None:
    """Make `parser` run `handler`; `name` (e.g. "models add") prefixes the command's error messages."""
    parser.set_defaults(handler=handler, command_name=name)


def require_registry(config: BridgeConfig) -> None:
    """Refuse a SQLite registry that does not exist: a command that only reads would otherwise create
    an empty one and report nothing, which looks like an empty fleet rather than the wrong file."""
    url = config.registry_url
    if url.startswith("sqlite"):
        db = Path(url.split(":///", 1)[-1])
        if not db.is_file():
            raise ConfigError(
                f"no registry database at {db}: start the bridge with this config first (`cloud-bridge run "
                "--config FILE`), or pass the config of the bridge whose state_dir or [registry] url holds it"
            )


@contextlib.asynccontextmanager
async def open_registry(config: BridgeConfig, *, create: bool = True) -> AsyncIterator[Registry]:
    """The bridge's registry, closed on exit. `create`: tables made or upgraded first (commands that
    write); else it must exist already (`require_registry`) and is used as it is."""
    if not create:
        require_registry(config)
    registry = Registry(config.registry_url)
    try:
        if create:
            await registry.create()
        yield registry
    finally:
        await registry.close()


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned columns two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
