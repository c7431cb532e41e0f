"""Bounded polling for state that has no event to wait on (counters, files, registry rows, logs).

`wait_for` blocks (plain tests, threads); `wait_for_async` yields to the event loop between probes
and also takes a coroutine function as its probe. Both return the first value `until` accepts, or
fail with an AssertionError that names what was awaited, the time allowed and the last value seen.
Waits that do have an event (an ingestor's `wait_for`, a collector's condition) should use it.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

# What a failure shows of the last value: enough to see what went wrong, not a whole export.
_SHOWN_CHARS = 800


def wait_for(
    probe: Callable[[], T],
    within: float,
    what: str | Callable[[], str],
    *,
    until: Callable[[T], object] = bool,
    interval: float = 0.05,
) -> T:
    """Call `probe` every `interval` seconds until `until(value)` holds, for `within` seconds at
    most; return that value."""
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if until(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(what, within, value))
        time.sleep(interval)


@overload
async def wait_for_async(
    probe: Callable[[], Awaitable[T]],
    within: float,
    what: str | Callable[[], str],
    *,
    until: Callable[[T], object] = ...,
    interval: float = ...,
) -> T: ...


@overload
async def wait_for_async(
    probe: Callable[[], T],
    within: float,
    what: str | Callable[[], str],
    *,
    until: Callable[[T], object] = ...,
    interval: float = ...,
) -> T: ...


async def wait_for_async(
    probe: Callable[[], Any],
    within: float,
    what: str | Callable[[], str],
    *,
    until: Callable[[Any], object] = bool,
    interval: float = 0.02,
) -> Any:
    """`wait_for` from a coroutine: `probe` may be a plain or a coroutine function."""
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if until(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(what, within, value))
        await asyncio.sleep(interval)


def _timed_out(what: str | Callable[[], str], within: float, value: object) -> str:
    described = what if isinstance(what, str) else what()
    shown = repr(value)
    if len(shown) > _SHOWN_CHARS:
        shown = shown[:_SHOWN_CHARS] + f"... ({len(shown)} chars)"
    return f"timed out after {within:g} s waiting for {described}; last seen: {shown}"
