"""What several `cloud-bridge` commands share: the `--config` option, opening the registry, tables."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TypeAlias

from cloud_bridge.registry import Registry

# What `add_subparsers` returns: the group each command module adds its parsers to (a string: the
# class is generic for type checkers only).
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Handler = Callable[[argparse.Namespace], int]


def add_config(parser: argparse.ArgumentParser, uses: str) -> None:
    """`--config FILE`: the bridge's TOML config, of which this command `uses` some sections."""
    parser.add_argument("--config", type=Path, default=None, help=f"the bridge's TOML config file ({uses})")


def command(parser: argparse.ArgumentParser, name: str, handler: Handler) -> None:
    """Make `parser` run `handler`; `name` (e.g. "models add") prefixes the command's error messages."""
    parser.set_defaults(handler=handler, command_name=name)


@contextlib.asynccontextmanager
async def open_registry(url: str) -> AsyncIterator[Registry]:
    """The registry at `url`, its tables made or upgraded, closed on exit."""
    registry = Registry(url)
    try:
        await registry.create()
        yield registry
    finally:
        await registry.close()


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned columns two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
