"""A device whose disk fills up: the node keeps inferring, says so in telemetry once it can write
again, and what it could store is delivered (issue 4, fault 5, at the level of the whole node)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from demokit.models import DemoModel
from devservers import Mosquitto
from schemas import Telemetry
from tests.edge_harness import RunningNode, edge_config, wait_connected
from tests.mqtt_collector import Collector
from tests.poll import wait_for_async


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs the test can fill (root only: mounting needs CAP_SYS_ADMIN)."""
    where = tmp_path / "disk"
    where.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def _fill(disk: Path) -> Path:
    ballast = disk / "ballast"
    with ballast.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass  # ENOSPC: the disk is full, which is the point
    return ballast


def _telemetry(c: Collector) -> list[Telemetry]:
    return [m for m in (r.message() for r in c.on("telemetry")) if isinstance(m, Telemetry)]


async def test_disk_full_node_keeps_inferring_and_reports_refused_writes(
    mosquitto: Mosquitto, demo_models: dict[str, DemoModel], small_disk: Path, tmp_path: Path
) -> None:
    config = edge_config(
        tmp_path,
        mosquitto.port,
        demo_models["edge"].path,
        outbox={"path": small_disk / "outbox.sqlite"},
        routing={"escalate": False},
        telemetry={"interval_s": 0.5},
        source={"kind": "replay", "rate_hz": 200.0, "loop": True},
    )
    with Collector(mosquitto.host, mosquitto.port, ["fleet/f1/dev-1/#"]) as c:
        async with RunningNode(config) as node:
            await wait_connected(node)
            await asyncio.to_thread(c.wait_for, lambda c: len(c.answers()) >= 50)
            outbox = node.outbox
            assert outbox is not None
            ballast = await asyncio.to_thread(_fill, small_disk)
            # No event marks "the outbox hit ENOSPC"; a bounded poll of its flag is enough here.
            await wait_for_async(
                lambda: outbox.available, 20, "the outbox to find its disk full", until=lambda ok: not ok, interval=0.05
            )
            processed_while_full = node.processed
            # Inference goes on while nothing can be stored.
            await wait_for_async(
                lambda: node.processed,
                20,
                "100 more inputs processed while the disk is full",
                until=lambda n: n >= processed_while_full + 100,
                interval=0.05,
            )
            assert not outbox.available
            ballast.unlink()
            await asyncio.to_thread(c.wait_for, lambda c: any(t.outbox.write_errors > 0 for t in _telemetry(c)), 30.0)
            await asyncio.to_thread(c.wait_for, lambda c: _telemetry(c)[-1].outbox.available, 30.0)
    reported = [t for t in _telemetry(c) if t.outbox.write_errors > 0]
    assert reported and reported[0].outbox.available
    assert sum(t.outbox.write_errors for t in _telemetry(c)) >= 1
