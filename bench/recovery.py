"""Recovery of a drifted device through the improvement loop, measured on held-out drifted inputs.

In one process with real files: the demo models are built and registered in a real SQLite registry
and model store; a drifted device (inputs rotated `--degrees`, default 20) runs the demo edge model on
a stream of rotated digits from the *training* split and archives, as its sampler would, the inputs it
is unsure of (entropy > 1.0 nats or margin < 0.2, examples/edge.toml's defaults); the archive is
exported as Label Studio tasks (`cloud_bridge.samples.export`), answered by
`demokit.labelers.StandInLabelingTeam` -- a STAND-IN for a labeling team that answers from the data
set's ground truth with `--error-rate` mistakes, at most `--human-labels` (300) of them -- and imported
(`cloud_bridge.samples.labels`). Then the loop runs as `cloud-bridge improve` runs it
(`cloud_bridge.improve.driver`): optional pseudo-labels from the cloud model (`--teacher`), a dataset
version, the built-in trainer as a subprocess, INT8 quantization, registration with lineage, the gate,
and a canary rollout row (the rollout itself is driven by bridges and devices, which
tests/test_rollout_e2e.py covers; here the candidate is what the rollout would install).

Every accuracy is measured on the digits *test* split, which neither the base model nor the loop ever
saw: the drifted device's edge-only accuracy before drift (clean inputs), after drift (rotated inputs,
base model) and after the loop (rotated inputs, the INT8 candidate); clean devices' loss (clean inputs,
base vs candidate); the drifted device's escalation rate (top-1 probability under 0.8) before and after.
The last line: `ratio X recovered/pre-drift accuracy` (target >= 0.95). Run: `python bench/recovery.py`
(about 30 s for the default 3 runs; the last line is their median).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_bridge.improve.driver import ImproveDriver
from cloud_bridge.improve.escalation_value import assess
from cloud_bridge.improve.store import LoopStore, NewLoop
from cloud_bridge.ingest.rows import add_message
from cloud_bridge.models.store import ModelRecord, ModelStore
from cloud_bridge.registry import Batch, Registry
from cloud_bridge.samples.export import ExportFilter, ExportOptions, export_resuming
from cloud_bridge.samples.labels import import_labels, label_counts
from cloud_bridge.samples.pseudo import probabilities
from demokit.drift import rotate
from demokit.labelers import StandInLabelingTeam
from demokit.models import build_demo_models, load_split
from schemas import ModelRef, Sample, TopK, encode_tensor, new_msg_id

FLEET, DEVICE = "bench", "drifted-1"
ENTROPY, MARGIN, CONFIDENCE = 1.0, 0.2, 0.8


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, escalation rate) of the model at `path` on x."""
    probs, _ = probabilities(path, x)
    return float(np.mean(np.argmax(probs, axis=1) == y)), float(np.mean(probs.max(axis=1) < CONFIDENCE))


async def _archive_uncertain(registry: Registry, edge: ModelRecord, x: np.ndarray, y: np.ndarray) -> dict[str, str]:
    """The device's sampler: archive the inputs it is unsure of; returns msg_id -> ground truth."""
    probs, labels = probabilities(edge.path, x)
    ref = ModelRef(name=edge.name, version=edge.version, sha256=edge.sha256)
    batch, lines, truth, now = Batch(), [], {}, time.time()
    for i in range(len(x)):
        order = np.argsort(-probs[i])
        entropy = float(-(probs[i] * np.log(np.clip(probs[i], 1e-12, 1))).sum())
        margin = float(probs[i, order[0]] - probs[i, order[1]])
        reasons = [r for r, hit in (("entropy", entropy > ENTROPY), ("margin", margin < MARGIN)) if hit]
        if not reasons:
            continue
        top = [TopK(label=labels[int(k)], index=int(k), prob=float(probs[i, k])) for k in order[:3]]
        sample = Sample(
            msg_id=new_msg_id(),
            fleet_id=FLEET,
            device_id=DEVICE,
            ts=now,
            model=ref,
            inference_id=f"inf-{i}",
            input=encode_tensor(x[i]),
            predicted=top[0].label,
            topk=top,
            entropy=entropy,
            margin=margin,
            reasons=reasons,  # type: ignore[arg-type]
            source_ref=f"bench:{i}",
        )
        add_message(batch, lines, sample, now)
        truth[sample.msg_id] = labels[int(y[i])]
    await registry.commit_batch(batch)
    return truth


async def run(args: argparse.Namespace, root: Path, seed: int) -> dict[str, float]:
    """One whole loop on a fresh registry; prints its lines and returns its figures."""
    models = build_demo_models(root.parent / "demo-models")
    split = load_split()
    registry = Registry(f"sqlite+aiosqlite:///{root / 'registry.db'}")
    await registry.create()
    try:
        store = ModelStore(root / "models", registry)
        edge = await store.add(models["edge"].path)
        await store.add(models["cloud"].path)
        rng = np.random.default_rng(seed)
        pick = rng.permutation(len(split.y_train))[: args.stream]
        stream_x = rotate(np.asarray(split.X_train)[pick], args.degrees)
        truth = await _archive_uncertain(registry, edge, stream_x, np.asarray(split.y_train)[pick])
        out = root / "export"
        options = ExportOptions(out_dir=out, label_studio=True, image_url_prefix="/data/local-files/?d=export/")
        await export_resuming(registry, ExportFilter(device=DEVICE), options, resume=True)
        team = StandInLabelingTeam(truth, split.labels, error_rate=args.error_rate, seed=seed, budget=args.human_labels)
        team.label_export(out / "label-studio.json", root / "labels.json")
        await import_labels(registry, root / "labels.json")
        cloud = await store.get("digits-cloud", "1.0.0")
        (value,) = await assess(registry, cloud.path)
        teacher = "digits-cloud@1.0.0" if args.teacher else None
        options_loop = {"stages": [25, 100], "min_human": 20, "holdout": args.holdout, "teacher": teacher}
        loop_id = await LoopStore(registry).create(NewLoop(FLEET, (DEVICE,), edge.name, edge.version, options_loop))
        driver = ImproveDriver(registry, store, root / "improve", "bench", cloud_model=cloud.path)
        started = time.perf_counter()
        await driver.run_until_settled()
        loop_s = time.perf_counter() - started
        loop = await LoopStore(registry).get(loop_id)
        assert loop is not None
        counts = await label_counts(registry)
        if loop["candidate_version"] is None:
            raise SystemExit(f"the loop ended {loop['state']}: {loop['reason']}")
        candidate = await store.get(edge.name, loop["candidate_version"])
    finally:
        await registry.close()
    x_clean, y = np.asarray(split.X_test), np.asarray(split.y_test)
    x_drift = rotate(x_clean, args.degrees)
    pre, esc_pre = _accuracy(edge.path, x_clean, y)
    drifted, esc_drift = _accuracy(edge.path, x_drift, y)
    recovered, esc_after = _accuracy(candidate.path, x_drift, y)
    clean_after, _ = _accuracy(candidate.path, x_clean, y)
    gate = loop["gate"] or {}
    print(f"-- run seed {seed}")
    print(
        f"escalation value on {value.labeled} human-labeled drifted samples: edge {value.edge_accuracy:.3f}, "
        f"cloud {value.cloud_accuracy:.3f} -> {value.verdict}"
    )
    print(
        f"stream {args.stream} rotated inputs, {len(truth)} archived as uncertain; labels: "
        f"{team.answered} human (stand-in, {team.mistakes} wrong on purpose), {counts.get('pseudo', 0)} pseudo"
    )
    print(
        f"loop {loop['state']}/{loop['phase']} in {loop_s:.1f} s, candidate {candidate.version}, "
        f"gate {gate.get('reason')}"
    )
    print(
        f"drifted device edge-only accuracy: pre-drift {pre:.4f}  after drift {drifted:.4f}  after loop {recovered:.4f}"
    )
    print(
        f"drifted device escalation rate:    pre-drift {esc_pre:.3f}  after drift {esc_drift:.3f}  "
        f"after loop {esc_after:.3f}"
    )
    print(f"clean devices: base {pre:.4f}  candidate {clean_after:.4f}  loss {100 * (pre - clean_after):+.2f} points")
    # What the device sends: where the gate found the cloud no better than the candidate on the inputs
    # the candidate is unsure of, replies tell the device to pause escalations for pause_s; it then asks
    # once per pause (the first unsure input after it), at `--hz` inferences a second.
    advice = gate.get("escalation") or {}
    pause_s = advice.get("pause_s")
    esc_sent = min(esc_after, 1.0 / (pause_s * args.hz)) if pause_s else esc_after
    print(
        f"escalation advice for the candidate: {advice.get('verdict', 'none')} (candidate "
        f"{advice.get('edge_accuracy', float('nan')):.3f}, cloud {advice.get('cloud_accuracy', float('nan')):.3f} on "
        f"{advice.get('labeled', 0)} {advice.get('slice', '')} holdout inputs); escalations sent after the loop "
        f"{esc_sent:.3f} of inferences at {args.hz:g} Hz"
    )
    return {
        "pre": pre,
        "drifted": drifted,
        "recovered": recovered,
        "clean_loss": pre - clean_after,
        "esc_drift": esc_drift,
        "esc_after": esc_after,
        "esc_sent": esc_sent,
        "human": team.answered,
        "pseudo": counts.get("pseudo", 0),
    }


async def run_all(args: argparse.Namespace, root: Path) -> None:
    results = []
    for r in range(args.runs):
        (root / f"run{r}").mkdir()
        results.append(await run(args, root / f"run{r}", args.seed + r))

    def median(key: str) -> float:
        return float(np.median([res[key] for res in results]))

    ratios = sorted(res["recovered"] / res["pre"] for res in results)
    print(f"== {args.runs} runs (seeds {args.seed}..{args.seed + args.runs - 1}), medians:")
    print(
        f"drifted device edge-only accuracy: pre-drift {median('pre'):.4f}  after drift {median('drifted'):.4f}  "
        f"after loop {median('recovered'):.4f}  (human labels <= {max(res['human'] for res in results):.0f}, "
        f"pseudo {median('pseudo'):.0f})"
    )
    print(f"clean devices' loss {100 * median('clean_loss'):+.2f} points (negative: the candidate is better there)")
    print(
        f"drifted device escalation rate {median('esc_drift'):.3f} after drift; after the loop "
        f"{median('esc_after'):.3f} of inputs under 0.8, {median('esc_sent'):.3f} sent (with the loop's advice)"
    )
    print(f"ratios per run: {', '.join(f'{x:.3f}' for x in ratios)}")
    print(f"ratio {float(np.median(ratios)):.3f} recovered/pre-drift accuracy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--degrees", type=float, default=20.0, help="rotation of the drifted device's inputs")
    parser.add_argument(
        "--stream", type=int, default=1000, help="drifted inputs the device sees (from the train split)"
    )
    parser.add_argument("--human-labels", type=int, default=300, help="labels the stand-in team gives at most")
    parser.add_argument("--error-rate", type=float, default=0.03, help="the stand-in team's share of wrong labels")
    parser.add_argument("--teacher", action="store_true", help="pseudo-label the rest with the cloud model")
    parser.add_argument("--seed", type=int, default=0, help="first seed (stream, labelers)")
    parser.add_argument("--runs", type=int, default=3, help="whole loops, one per seed; the headline is the median")
    parser.add_argument("--hz", type=float, default=1.0, help="the device's inferences per second (the fleet's 1)")
    parser.add_argument("--holdout", type=float, default=0.2, help="share of human labels the gate keeps (0.2)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # onnxruntime.quantization advises pre-processing on every call
    with tempfile.TemporaryDirectory(prefix="recovery-") as tmp:
        asyncio.run(run_all(args, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
