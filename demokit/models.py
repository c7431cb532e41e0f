"""Train and export the demo ONNX models from the bundled digits dataset.

Two real models come out of ``python -m demokit.models --out DIR``:

* ``digits-edge-1.0.0.onnx``: a small MLP (64→12→10) that is deliberately modest, so a fair share of
  inputs are unsure and get escalated; its output ``logits`` holds raw logits.
* ``digits-cloud-1.0.0.onnx``: a larger MLP (64→256→128→10), more accurate; its output
  ``probabilities`` holds softmax probabilities.

Both take raw pixels (float32 [N, 64], 0..16) as input ``input``: the standardisation fitted on the
training split is folded into the first layer's weights, so callers never scale anything. Every file
carries metadata_props describing its labels, input, output kind and held-out accuracy, the last one
measured by running the exported file in ONNX Runtime (so the export itself is verified).

Each file also ships ``health_reference`` metadata: a few held-out inputs and the probabilities
the exported file gives them, which an edge node installing the model over the air re-runs as its
health check (edge_node/ota/health.py) before switching to it.

Builds are deterministic (same seed → byte-identical files) and cached: a file whose recorded
training configuration matches is reused rather than retrained. Edge variants for OTA and rollout
tests (a better v1.1.0, a deliberately bad model) come from :func:`build_edge_model`.

scikit-learn and onnx are needed for building only; reading metadata needs onnxruntime alone.
Training is demokit/training.py's, the ONNX graph and its metadata demokit/export.py's; this module
builds, caches and verifies the files, reads them back, and is the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from common.files import write_atomic
from common.onnx import read_card
from demokit.dataset import NUM_FEATURES, DigitsSplit
from demokit.export import (
    INPUT_NAME,
    ModelFileError,
    class_mix,
    cpu_session,
    predict,
    set_health_reference,
    set_metadata,
    to_onnx,
)
from demokit.training import SPLIT_SEED, TEST_FRACTION, TrainConfig, model_file_name, train
from schemas.modelcard import ModelCard

__all__ = [
    "CLOUD_NAME",
    "DEFAULT_VERSION",
    "EDGE_NAME",
    "DemoModel",
    "ModelFileError",
    "TrainConfig",
    "build_demo_models",
    "build_edge_model",
    "build_model",
    "cloud_config",
    "count_parameters",
    "edge_config",
    "evaluate_accuracy",
    "load_split",
    "main",
    "measure_latency_us",
    "model_file_name",
    "read_model_card",
]

logger = logging.getLogger(__name__)

EDGE_NAME = "digits-edge"
CLOUD_NAME = "digits-cloud"
DEFAULT_VERSION = "1.0.0"
EDGE_HIDDEN: tuple[int, ...] = (12,)
CLOUD_HIDDEN: tuple[int, ...] = (256, 128)
# Few enough epochs that the small edge model stays modest (≈95 %) and the build stays fast.
EDGE_MAX_ITER = 200
CLOUD_MAX_ITER = 200


@dataclass(frozen=True)
class DemoModel:
    """One exported model file and what is known about it."""

    kind: str
    name: str
    version: str
    path: Path
    sha256: str
    heldout_accuracy: float
    labels: tuple[str, ...]


def edge_config(
    version: str = DEFAULT_VERSION,
    *,
    hidden: Sequence[int] = EDGE_HIDDEN,
    seed: int = 0,
    max_iter: int = EDGE_MAX_ITER,
    shuffle_labels: bool = False,
    name: str = EDGE_NAME,
) -> TrainConfig:
    return TrainConfig(
        kind="edge",
        name=name,
        version=version,
        hidden=tuple(hidden),
        output_kind="logits",
        seed=seed,
        max_iter=max_iter,
        shuffle_labels=shuffle_labels,
        # Calibrated logits (demokit/training.py); not the deliberately wrong model, whose confident
        # wrong answers the rollback tests count on.
        calibrate=not shuffle_labels,
    )


def cloud_config(version: str = DEFAULT_VERSION, *, seed: int = 0) -> TrainConfig:
    return TrainConfig(
        kind="cloud",
        name=CLOUD_NAME,
        version=version,
        hidden=CLOUD_HIDDEN,
        output_kind="probabilities",
        seed=seed,
        max_iter=CLOUD_MAX_ITER,
    )


def load_split() -> DigitsSplit:
    """The split every demo model is trained and scored on."""
    from demokit.dataset import load_digits_split

    return load_digits_split(seed=SPLIT_SEED, test_fraction=TEST_FRACTION)


def build_demo_models(out_dir: Path, seed: int = 0) -> dict[str, DemoModel]:
    """Build (or reuse) the edge and cloud demo models in ``out_dir``; keys are "edge" and "cloud"."""
    split = load_split()
    return {
        "edge": build_model(out_dir, edge_config(seed=seed), split),
        "cloud": build_model(out_dir, cloud_config(seed=seed), split),
    }


def build_edge_model(
    out_dir: Path,
    version: str,
    *,
    hidden: Sequence[int] = EDGE_HIDDEN,
    seed: int = 0,
    max_iter: int = EDGE_MAX_ITER,
    shuffle_labels: bool = False,
    name: str = EDGE_NAME,
) -> DemoModel:
    """Build an edge variant: more ``hidden`` units for a better model; ``shuffle_labels`` or a tiny
    ``max_iter`` for a deliberately bad one (for rollout/rollback tests)."""
    config = edge_config(version, hidden=hidden, seed=seed, max_iter=max_iter, shuffle_labels=shuffle_labels, name=name)
    return build_model(out_dir, config, load_split())


def build_model(out_dir: Path, config: TrainConfig, split: DigitsSplit, *, force: bool = False) -> DemoModel:
    """Train, export and verify one model, unless a matching file already exists (and not ``force``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / config.file_name
    if not force:
        cached = _cached_model(path, config)
        if cached is not None:
            logger.info("reusing cached model path=%s", path)
            return cached
    started = time.perf_counter()
    trained = train(config, split)
    model = to_onnx(config, trained.layers, split.labels)
    predictions = predict(model.SerializeToString(), path, split.X_test)
    accuracy = float(np.mean(predictions == split.y_test))
    mix = class_mix(predictions, split.labels)
    set_metadata(model, config, split.labels, accuracy, mix, temperature=trained.temperature)
    set_health_reference(model, path, config.output_kind, split)
    data = model.SerializeToString()
    write_atomic(path, data)  # a reader (or a cache check) never sees a half-written model
    _verify_file(path, split, accuracy)
    logger.info(
        "built model name=%s version=%s accuracy=%.4f seconds=%.2f path=%s",
        config.name,
        config.version,
        accuracy,
        time.perf_counter() - started,
        path,
    )
    return _demo_model(path, config.kind, read_model_card(path), hashlib.sha256(data).hexdigest())


def read_model_card(path: Path) -> ModelCard:
    """What an ONNX file's metadata says (common/onnx.py, read with onnxruntime: no onnx package needed);
    raises ModelFileError for a file that is not a classifier with valid metadata."""
    return read_card(path, error=ModelFileError)


def evaluate_accuracy(path: Path, split: DigitsSplit | None = None) -> float:
    """Held-out accuracy of an exported file, run through onnxruntime."""
    split = split if split is not None else load_split()
    predictions = predict(path.read_bytes(), path, split.X_test)
    return float(np.mean(predictions == split.y_test))


def measure_latency_us(path: Path, sample: NDArray[np.float32], runs: int = 2000) -> float:
    """Mean wall time of one batch-1 ``InferenceSession.run`` in microseconds."""
    session = cpu_session(path.read_bytes(), path)
    feed = {INPUT_NAME: np.ascontiguousarray(sample.reshape(1, NUM_FEATURES), dtype=np.float32)}
    for _ in range(min(100, runs)):
        session.run(None, feed)
    started = time.perf_counter_ns()
    for _ in range(runs):
        session.run(None, feed)
    return (time.perf_counter_ns() - started) / runs / 1000.0


def count_parameters(path: Path) -> int:
    import onnx

    model = onnx.load(str(path))
    return sum(int(np.prod(tensor.dims)) for tensor in model.graph.initializer)


def _cached_model(path: Path, config: TrainConfig) -> DemoModel | None:
    if not path.exists():
        return None
    try:
        card = read_model_card(path)
        if card.train_config != config.to_json():
            logger.info("cached model does not match config path=%s", path)
            return None
        return _demo_model(path, config.kind, card, hashlib.sha256(path.read_bytes()).hexdigest())
    except ModelFileError as exc:  # a truncated or foreign file is rebuilt, not trusted
        logger.warning("unreadable cached model path=%s error=%s", path, exc)
        return None


def _demo_model(path: Path, kind: str, card: ModelCard, sha256: str) -> DemoModel:
    if card.heldout_accuracy is None:
        raise ModelFileError(f"model {path} has no 'heldout_accuracy' metadata: the demo kit did not build it")
    return DemoModel(
        kind=kind,
        name=card.name,
        version=card.version,
        path=path,
        sha256=sha256,
        heldout_accuracy=card.heldout_accuracy,
        labels=card.labels,
    )


def _verify_file(path: Path, split: DigitsSplit, expected_accuracy: float) -> None:
    accuracy = evaluate_accuracy(path, split)
    if abs(accuracy - expected_accuracy) > 1e-9:
        raise RuntimeError(f"exported {path} scores {accuracy:.6f}, expected {expected_accuracy:.6f}")


def _format_table(models: Sequence[DemoModel], split: DigitsSplit) -> str:
    header = f"{'model':<24} {'params':>8} {'size':>10} {'held-out acc':>12} {'batch-1 run':>12}"
    rows = [header, "-" * len(header)]
    for model in models:
        accuracy = evaluate_accuracy(model.path, split)
        latency = measure_latency_us(model.path, split.X_test[0])
        rows.append(
            f"{model.name + ' ' + model.version:<24} {count_parameters(model.path):>8} "
            f"{model.path.stat().st_size / 1024:>8.1f}KB {accuracy * 100:>11.2f}% {latency:>10.1f}µs"
        )
    return "\n".join(rows)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demokit.models",
        description=(
            "Train the demo digit classifiers on scikit-learn's bundled digits (CC BY 4.0) and export "
            "them as ONNX: digits-edge (small MLP, raw logits) and digits-cloud (larger MLP, softmax "
            "probabilities). Files already in --out with the same training config are reused. "
            "With --edge-version, build only that edge variant (e.g. a better 1.1.0 with --edge-hidden 32, "
            "or a bad one with --shuffle-labels)."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write the .onnx files into")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0); same seed → same bytes")
    parser.add_argument("--edge-version", help="build only an edge variant with this version, e.g. 1.1.0")
    parser.add_argument(
        "--edge-hidden",
        type=int,
        nargs="+",
        default=list(EDGE_HIDDEN),
        help=f"hidden layer sizes of the edge variant (default {' '.join(map(str, EDGE_HIDDEN))})",
    )
    parser.add_argument(
        "--edge-max-iter",
        type=int,
        default=EDGE_MAX_ITER,
        help=f"training epochs of the edge variant (default {EDGE_MAX_ITER}; a few gives a poor model)",
    )
    parser.add_argument(
        "--shuffle-labels",
        action="store_true",
        help="train the edge variant on shuffled labels (a bad model)",
    )
    parser.add_argument("--force", action="store_true", help="retrain even if matching files exist")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = _parse_args(argv)
    split = load_split()
    if args.edge_version is not None:
        configs = [
            edge_config(
                args.edge_version,
                hidden=args.edge_hidden,
                seed=args.seed,
                max_iter=args.edge_max_iter,
                shuffle_labels=args.shuffle_labels,
            )
        ]
    else:
        configs = [edge_config(seed=args.seed), cloud_config(seed=args.seed)]
    models = [build_model(args.out, config, split, force=args.force) for config in configs]
    print(_format_table(models, split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
