"""`make demo` end to end, shortened: its own broker, the cloud bridge, three edge nodes replaying real
digits; one drifts and must be alerted on, a canary rollout must finish, and nothing may be lost."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(300)
def test_demo_runs_a_fleet_detects_drift_rolls_out_and_loses_nothing(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "demo", "--seconds", "55", "--devices", "3", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-3000:]
    assert "messages lost: 0" in out
    assert "demo OK" in out
    assert out.count("accuracy edge-only") == 3
    assert re.search(r"drift alert: pi-0003 \w+ at t=\d+s .*after the drift began", out), out[-3000:]
    alert_lines = "\n".join(line for line in out.splitlines() if "alert" in line or "latency" in line)
    assert "drift alerts on devices without injected drift: 0" in out, alert_lines
    assert re.search(r"rollout [0-9a-f-]+ of digits-edge 1\.1\.0: (promoted|rolled_back)", out), out[-3000:]
    report = (workdir / "report" / "report.html").read_text()
    assert "accuracy.png" in report and (workdir / "report" / "accuracy.png").stat().st_size > 10_000
