"""`make demo` end to end, with three devices: its own broker, the cloud bridge, edge nodes replaying real
digits. One drifts and must be alerted on; its samples go to the stand-in labeling team and back; the
bridge's [improve] policy retrains, gates, shadows, canaries and promotes a new model; the drifted device
must recover, and nothing may be lost."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(480)
def test_demo_detects_drift_closes_the_loop_recovers_and_loses_nothing(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "demo", "--devices", "3", "--workdir", str(workdir), "--seconds", "300"],
        capture_output=True,
        text=True,
        timeout=460,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-5000:] + proc.stderr[-3000:]
    assert "messages lost: 0" in out
    assert "demo OK" in out
    assert out.count("accuracy edge-only") == 3
    assert re.search(r"drift alert: pi-0003 \w+ at t=\d+s .*after the drift began", out), out[-3000:]
    alert_lines = "\n".join(line for line in out.splitlines() if "alert" in line)
    assert "drift alerts on devices without injected drift: 0" in out, alert_lines
    # The loop, through the real commands and the bridge's policy, with the stand-in named as one.
    assert re.search(r"exported \d+ samples of pi-0003 to the stand-in labeling team", out), out[-3000:]
    assert re.search(r"imported \d+ labels from the stand-in labeling team", out)
    assert re.search(r"improve loop [0-9a-f]{8}: gate passed", out)
    rollout = re.search(
        r"rollout [0-9a-f-]+ of digits-edge (1\.0\.0\+r\.[0-9a-f]{8}\.int8) \(stages (\S+)\): (\w+)", out
    )
    assert rollout is not None and rollout[2] == "shadow:100,25,100" and rollout[3] == "promoted", out[-3000:]
    recovered = re.search(r"after recovery\s+(0\.\d+)\s+\((\d+) rotated inputs, " + re.escape(rollout[1]), out)
    before = re.search(r"before drift\s+(0\.\d+)", out)
    after = re.search(r"after drift\s+(0\.\d+)", out)
    assert recovered is not None and before is not None and after is not None, out[-3000:]
    assert float(after[1]) < 0.8 < 0.93 <= float(before[1]) and float(recovered[1]) >= 0.93
    assert int(recovered[2]) >= 200
    assert re.search(r"time from drift start to recovery: \d+s", out)
    assert re.search(
        r"human labels used: \d+ \(\d+ trained on, \d+ held out for the gate\); pseudo-labels used: 0", out
    )
    assert re.search(r"escalation rate \(edge unsure\): before drift 0\.\d+, after drift 0\.\d+, after recovery", out)
    report = (workdir / "report" / "report.html").read_text()
    assert "recovery.png" in report and (workdir / "report" / "recovery.png").stat().st_size > 10_000
    assert (workdir / "report" / "accuracy.png").stat().st_size > 10_000
