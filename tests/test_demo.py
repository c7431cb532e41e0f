"""`make demo` end to end, shortened: its own broker, the cloud bridge, three edge nodes, no loss."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_runs_a_fleet_and_loses_nothing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "demo", "--seconds", "10", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=110,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "messages lost: 0" in out
    assert "demo OK" in out
    assert out.count("accuracy edge-only") == 3
