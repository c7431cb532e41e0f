"""Drift detection on real data: detection delay per injected drift kind and false alerts when stationary.

Telemetry windows are made the way an edge node makes them, in-process for speed: the digits held-out
set is replayed in order (cycled, as `ReplaySource` does), each batch goes through the real demo edge
model (ONNX Runtime), `edge_node.routing.confidence.decide` and an `edge_node.telemetry.Window`, and every
window becomes a real `Telemetry` message (`build_telemetry`) whose builtins form is what the bridge
scores (`WindowStats.from_body`, as the ingest path does). The latency of each window is the measured
model run time. Drift is injected with `demokit.drift.DriftSpec` from window `--drift-at` on.

The detector is `cloud_bridge.drift.scoring.Detector`, the same maths the bridge runs on its stored state.
Per kind (noise, rotation, class shift, plus a latency regression) and several seeds it reports the
delay from the first drifted window to the first firing alert, in windows; stationary runs give the
false-alert rate (firing alerts per 1000 windows). Baseline: the first windows (default) or the
model's reference class mix (`--reference`).

The last line is the headline: `ratio D.DD detected/injected` over every drifted run, with the false
alerts in stationary runs just above it. Run: `python bench/drift.py` (about a minute).

Above it, what drift costs the bridge per telemetry window (bench/drift_cost.py says how it is
measured). `--cost` runs only that, `--repeat` times (default 5), and ends with its own headline,
`ratio R.RR CPU per window with drift / without`, with the line on drift's CPU per window against
the 100 us target above it; `--database postgresql` runs it on a private PostgreSQL server
(devservers/postgres.py):

    .venv/bin/python bench/drift.py --cost
    .venv/bin/python bench/drift.py --cost --database postgresql
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.drift_cost import measure, tmp_sqlite
from bench.drift_cost import report as cost_report
from cloud_bridge.drift.scoring import Detector, DriftSettings, Transition
from cloud_bridge.drift.windows import WindowStats
from demokit.drift import DriftSpec
from demokit.models import build_demo_models, load_split, read_model_card
from devservers.postgres import create_database, postgres_server
from edge_node.inference.model import Classifier
from edge_node.routing.confidence import decide
from edge_node.telemetry import TelemetryContext, Window, build_telemetry
from schemas import OutboxStats, Providers, Telemetry, to_builtins

log = logging.getLogger(__name__)

CASES: dict[str, str] = {
    "stationary": "none",
    "noise": "noise:4",
    "rotation": "rotation:20",
    "class_shift": "class_shift:0.3",
    "latency": "latency:5",
}


@dataclass(frozen=True)
class StreamSpec:
    window_size: int = 100
    windows: int = 80
    drift_at: int = 30
    seed: int = 0


class DigitsStream:
    """Telemetry windows (as the bridge stores them) of a replayed, optionally drifted digits stream."""

    def __init__(
        self,
        classifier: Classifier,
        X: npt.NDArray[np.float32],
        y: npt.NDArray[np.int64],
        fleet_id: str = "bench",
        device_id: str = "dev-1",
    ) -> None:
        self.classifier = classifier
        self.X, self.y = X, y
        self.model = classifier.info.ref
        providers = Providers(requested=["CPUExecutionProvider"], active=["CPUExecutionProvider"], fallback=False)
        self.ctx = TelemetryContext(fleet_id, device_id, providers)

    def windows(self, spec: StreamSpec, drift: str) -> Iterator[WindowStats]:
        """The windows as the bridge scores them (the builtins form it stores, as ingestion does)."""
        for message in self.telemetry(spec, drift):
            yield WindowStats.from_body(to_builtins(message))

    def telemetry(self, spec: StreamSpec, drift: str, t0: float = 1_800_000_000.0) -> Iterator[Telemetry]:
        """Telemetry messages, one per `spec.window_size` inferences, 10 s apart from `t0`."""
        rng = np.random.default_rng(spec.seed)
        kind, _, strength = drift.partition(":")
        slow = float(strength) if kind == "latency" else 1.0
        drifted = self.X, self.y
        if kind not in ("none", "latency"):
            drifted = DriftSpec.parse(drift).apply(self.X, self.y, rng)
        offset = int(rng.integers(len(self.y)))  # each seed starts the replay at another point
        t = t0
        for index in range(spec.windows):
            on = index >= spec.drift_at
            X = drifted[0] if on and kind not in ("none", "latency") else self.X
            start = offset + index * spec.window_size
            rows = np.arange(start, start + spec.window_size) % len(X)
            yield self._window(X[rows], t, index, slow if on else 1.0)
            t += 10.0

    def _window(self, batch: npt.NDArray[np.float32], t: float, seq: int, slow: float) -> Telemetry:
        window = Window(max_features=64, started=t)
        began = time.perf_counter()
        probs = self.classifier.predict(np.ascontiguousarray(batch))
        run_ms = (time.perf_counter() - began) * 1000 / len(batch)
        d = decide(probs, 0.8)
        window.add_batch(batch, d.confidence, d.entropy)
        labels = [self.classifier.info.labels[i] for i in d.top1]
        # Per-input latency: the measured run time plus a stand-in for the node's queueing (1 ms scale).
        lat = np.full(len(batch), (run_ms + 0.5) * slow) * (1 + 0.2 * np.random.default_rng(seq).random(len(batch)))
        window.add_final(labels, "edge", lat)
        return build_telemetry(
            self.ctx, self.model, window, seq=seq, now=t + 10.0, samples=(0, 0), outbox=OutboxStats(), resources=None
        )


@dataclass
class CaseResult:
    name: str
    runs: int = 0
    windows: int = 0
    detected: int = 0
    delays: list[int] | None = None
    false_alerts: int = 0
    kinds: dict[str, int] | None = None
    headroom: dict[str, float] | None = None  # max score / fire threshold seen before any drift


def run_case(
    stream: DigitsStream,
    name: str,
    drift: str,
    spec: StreamSpec,
    settings: DriftSettings,
    seeds: int,
    mix: dict[str, float] | None,
) -> CaseResult:
    from cloud_bridge.drift.scoring import reference_baseline

    result = CaseResult(name, delays=[], kinds={}, headroom={})
    assert result.delays is not None and result.kinds is not None and result.headroom is not None
    for seed in range(seeds):
        detector = Detector(settings, baseline=reference_baseline(mix) if mix else None)
        first: int | None = None
        for index, window in enumerate(
            stream.windows(StreamSpec(spec.window_size, spec.windows, spec.drift_at, seed), drift)
        ):
            scores, transitions = detector.add(window)
            if drift == "none" or index < spec.drift_at:
                for sc in scores:
                    ratio = sc.score / sc.high if sc.high > 0 else 0.0
                    result.headroom[sc.kind] = max(result.headroom.get(sc.kind, 0.0), ratio)
            firing = [t for t in transitions if t.state == "firing"]
            result.windows += 1
            if drift == "none" or index < spec.drift_at:
                result.false_alerts += len(firing)
            elif firing and first is None:
                first = index - spec.drift_at + 1
                _count_kinds(result.kinds, firing)
        result.runs += 1
        if drift != "none" and first is not None:
            result.detected += 1
            result.delays.append(first)
    return result


def _count_kinds(kinds: dict[str, int], firing: list[Transition]) -> None:
    for t in firing:
        kinds[t.kind] = kinds.get(t.kind, 0) + 1


def report(results: list[CaseResult], spec: StreamSpec, settings: DriftSettings, baseline: str, elapsed: float) -> str:
    head = (
        f"{'case':<12} {'runs':>5} {'windows':>8} {'detected':>9} {'delay p50':>10} {'delay max':>10} "
        f"{'false/1000w':>12}  first kinds"
    )
    lines = [
        f"drift benchmark: digits replay through the demo edge model, {spec.window_size} inferences per window, "
        f"drift from window {spec.drift_at} of {spec.windows}; baseline {baseline}",
        f"settings: {json.dumps(settings.__dict__)}",
        "",
        head,
        "-" * len(head),
    ]
    for r in results:
        delays = r.delays or []
        p50 = f"{statistics.median(delays):.1f}" if delays else "-"
        mx = f"{max(delays)}" if delays else "-"
        rate = 1000 * r.false_alerts / max(r.windows, 1)
        kinds = ",".join(f"{k}:{v}" for k, v in sorted((r.kinds or {}).items())) or "-"
        det = f"{r.detected}/{r.runs}" if r.name != "stationary" else "-"
        lines.append(f"{r.name:<12} {r.runs:>5} {r.windows:>8} {det:>9} {p50:>10} {mx:>10} {rate:>12.2f}  {kinds}")
    drifted = [r for r in results if r.name != "stationary"]
    stationary = [r for r in results if r.name == "stationary"]
    all_windows = sum(r.windows for r in results)
    false_total = sum(r.false_alerts for r in results)
    quiet = sum(r.windows for r in stationary)
    headroom: dict[str, float] = {}
    for r in results:
        for kind, value in (r.headroom or {}).items():
            headroom[kind] = max(headroom.get(kind, 0.0), value)
    lines += [
        "",
        "largest score / fire threshold in undrifted windows: "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(headroom.items())),
        f"stationary: {sum(r.false_alerts for r in stationary)} false alerts in {quiet} windows "
        f"({1000 * sum(r.false_alerts for r in stationary) / max(quiet, 1):.2f} per 1000 windows); "
        f"all pre-drift windows: {false_total} in {all_windows}",
        f"elapsed {elapsed:.1f} s",
        f"ratio {sum(r.detected for r in drifted) / max(sum(r.runs for r in drifted), 1):.2f} detected/injected",
    ]
    return "\n".join(lines)


# ---- the bridge path: drift inside the ingest transaction (bench/drift_cost.py) -----------------------
def fleet_messages(stream: DigitsStream, devices: int, windows: int) -> list[list[Telemetry]]:
    """`windows` batches, each holding one telemetry window of every device (stationary digits)."""
    per_device = [
        list(
            DigitsStream(stream.classifier, stream.X, stream.y, "bench", f"dev-{d}").telemetry(
                StreamSpec(windows=windows, drift_at=windows, seed=d), "none"
            )
        )
        for d in range(devices)
    ]
    return [[per_device[d][i] for d in range(devices)] for i in range(windows)]


def bridge_cost(
    stream: DigitsStream, settings: DriftSettings, devices: int, windows: int, repeat: int, database: str
) -> list[str]:
    """The cost lines of bench/drift_cost.py (its headline ratio last)."""
    messages = fleet_messages(stream, devices, windows)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if database == "postgresql":
        with postgres_server() as port:
            result = measure(messages, settings, repeat, database, lambda name: create_database(port, name), port)
    else:
        tmp, url_for = tmp_sqlite()
        with tmp:
            result = measure(messages, settings, repeat, database, url_for, None)
    return cost_report(result, load)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("build/models"), help="where the demo models are built")
    parser.add_argument("--seeds", type=int, default=5, help="runs per case (each starts the replay elsewhere)")
    parser.add_argument("--windows", type=int, default=80, help="windows per run")
    parser.add_argument("--drift-at", type=int, default=30, help="first drifted window")
    parser.add_argument("--window-size", type=int, default=100, help="inferences per telemetry window")
    parser.add_argument("--reference", action="store_true", help="baseline class mix from the model's metadata")
    parser.add_argument("--stationary-seeds", type=int, default=20, help="runs of the stationary case")
    parser.add_argument("--devices", type=int, default=200, help="devices per batch in the bridge-path timing")
    parser.add_argument("--cost", action="store_true", help="only the bridge-path timing (its ratio is the headline)")
    parser.add_argument("--repeat", type=int, default=None, help="bridge-path timings (default: 5 with --cost, else 1)")
    parser.add_argument(
        "--batches", type=int, default=40, help="batches (windows per device) in the bridge-path timing"
    )
    parser.add_argument(
        "--database", choices=("sqlite", "postgresql"), default="sqlite", help="registry of the bridge-path timing"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    args = parse_args(argv)
    started = time.perf_counter()
    demo = build_demo_models(args.models)["edge"]
    split = load_split()
    stream = DigitsStream(Classifier.load(demo.path), np.asarray(split.X_test), np.asarray(split.y_test))
    settings = DriftSettings()
    repeat = args.repeat if args.repeat is not None else (5 if args.cost else 1)
    cost = bridge_cost(stream, settings, args.devices, args.batches, repeat, args.database)
    if args.cost:
        print("\n".join(cost))
        return 0
    mix = read_model_card(demo.path).reference_class_mix if args.reference else None
    spec = StreamSpec(args.window_size, args.windows, args.drift_at)
    results = [
        run_case(stream, name, drift, spec, settings, args.stationary_seeds if drift == "none" else args.seeds, mix)
        for name, drift in CASES.items()
    ]
    baseline = "reference class mix + first windows" if mix else "first windows"
    lines = report(results, spec, settings, baseline, time.perf_counter() - started).splitlines()
    lines[-1:-1] = cost[:-1]  # the cost's own headline would compete with the detection ratio
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
