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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from common.files import write_atomic
from common.numeric import softmax
from common.onnx import open_session, read_card
from demokit.dataset import DATASET_LICENCE, DATASET_NAME, NUM_FEATURES, PIXEL_MAX, DigitsSplit
from schemas.modelcard import ModelCard, OutputKind

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

# Bump when training or export changes in a way that alters the files, so cached files are rebuilt.
BUILDER_REVISION = 2
OPSET = 17
# IR 8 is the revision that introduced opset 17; every onnxruntime >= 1.12 loads it.
IR_VERSION = 8
# All models share one held-out set, whatever their training seed, so their accuracies compare and
# the replay source (which replays the test split) never shows a model its own training data.
SPLIT_SEED = 0
TEST_FRACTION = 0.3
INPUT_NAME = "input"
EDGE_NAME = "digits-edge"
CLOUD_NAME = "digits-cloud"
DEFAULT_VERSION = "1.0.0"
EDGE_HIDDEN: tuple[int, ...] = (12,)
CLOUD_HIDDEN: tuple[int, ...] = (256, 128)
# Held-out rows shipped as the OTA health-check reference (spread over the test split).
HEALTH_REFERENCE_ROWS = 8
# Few enough epochs that the small edge model stays modest (≈95 %) and the build stays fast.
EDGE_MAX_ITER = 200
CLOUD_MAX_ITER = 200
L2_ALPHA = 1e-3


class ModelFileError(Exception):
    """A model file the demo kit reads is not an ONNX classifier with valid metadata (the message says why)."""


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


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a model file's bytes; recorded in it to validate the cache."""

    kind: str
    name: str
    version: str
    hidden: tuple[int, ...]
    output_kind: OutputKind
    seed: int
    max_iter: int
    shuffle_labels: bool = False
    alpha: float = L2_ALPHA
    builder_revision: int = BUILDER_REVISION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def file_name(self) -> str:
        return model_file_name(self.name, self.version)


@dataclass(frozen=True)
class _Layer:
    weight: NDArray[np.float32]  # [in, out], used as Gemm(X, W) + b
    bias: NDArray[np.float32]


def model_file_name(name: str, version: str) -> str:
    return f"{name}-{version}.onnx"


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
    layers = _train(config, split)
    model = _to_onnx(config, layers, split.labels)
    predictions = _predict(model.SerializeToString(), path, split.X_test)
    accuracy = float(np.mean(predictions == split.y_test))
    _set_metadata(model, config, split.labels, accuracy, _class_mix(predictions, split.labels))
    _set_health_reference(model, path, config.output_kind, split)
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
    predictions = _predict(path.read_bytes(), path, split.X_test)
    return float(np.mean(predictions == split.y_test))


def measure_latency_us(path: Path, sample: NDArray[np.float32], runs: int = 2000) -> float:
    """Mean wall time of one batch-1 ``InferenceSession.run`` in microseconds."""
    session = _session(path.read_bytes(), path)
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


def _train(config: TrainConfig, split: DigitsSplit) -> list[_Layer]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    # One global scale (pixels / 16), not per-pixel standardisation: border pixels are almost always
    # blank, and dividing by their tiny spread made a little noise or a 10° rotation wreck accuracy.
    mean = np.zeros(NUM_FEATURES, dtype=np.float64)
    std = np.full(NUM_FEATURES, PIXEL_MAX, dtype=np.float64)
    targets = np.asarray(split.y_train)
    if config.shuffle_labels:
        targets = np.random.default_rng(config.seed).permutation(targets)
    classifier = MLPClassifier(
        hidden_layer_sizes=config.hidden,
        activation="relu",
        alpha=config.alpha,
        max_iter=config.max_iter,
        random_state=config.seed,
    )
    with warnings.catch_warnings():
        # Stopping before convergence is deliberate for the modest and the bad edge models.
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit((split.X_train - mean) / std, targets)
    weights = [np.asarray(w, dtype=np.float64) for w in classifier.coefs_]
    biases = [np.asarray(b, dtype=np.float64) for b in classifier.intercepts_]
    return _fold_scaling(weights, biases, mean, std)


def _fold_scaling(
    weights: list[NDArray[np.float64]],
    biases: list[NDArray[np.float64]],
    mean: NDArray[np.float64],
    std: NDArray[np.float64],
) -> list[_Layer]:
    # ((x - mean) / std) @ W + b == x @ (W / std[:, None]) + (b - (mean / std) @ W),
    # so the exported graph takes raw pixels.
    first_weight = weights[0] / std[:, None]
    first_bias = biases[0] - (mean / std) @ weights[0]
    folded = [(first_weight, first_bias), *zip(weights[1:], biases[1:], strict=True)]
    return [_Layer(weight=w.astype(np.float32), bias=b.astype(np.float32)) for w, b in folded]


def _to_onnx(config: TrainConfig, layers: list[_Layer], labels: tuple[str, ...]) -> onnx.ModelProto:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current = INPUT_NAME
    for index, layer in enumerate(layers):
        weight_name, bias_name, out_name = f"W{index}", f"B{index}", f"dense{index}"
        initializers += [
            numpy_helper.from_array(layer.weight, weight_name),
            numpy_helper.from_array(layer.bias, bias_name),
        ]
        is_last = index == len(layers) - 1
        if is_last and config.output_kind == "logits":
            out_name = "logits"
        nodes.append(helper.make_node("Gemm", [current, weight_name, bias_name], [out_name], name=f"gemm{index}"))
        current = out_name
        if not is_last:
            nodes.append(helper.make_node("Relu", [current], [f"relu{index}"], name=f"relu{index}"))
            current = f"relu{index}"
    if config.output_kind == "probabilities":
        nodes.append(helper.make_node("Softmax", [current], ["probabilities"], axis=1, name="softmax"))
        current = "probabilities"
    graph = helper.make_graph(
        nodes,
        config.name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", NUM_FEATURES])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["N", len(labels)])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="edgefleet.demo_models",
        producer_version=str(BUILDER_REVISION),
        doc_string=_doc_string(config, layers),
    )
    onnx.checker.check_model(model)
    return model


def _doc_string(config: TrainConfig, layers: list[_Layer]) -> str:
    shape = "→".join([str(NUM_FEATURES), *(str(layer.bias.shape[0]) for layer in layers)])
    trained_on = "SHUFFLED labels (deliberately bad)" if config.shuffle_labels else "the digits train split"
    return (
        f"{config.name} {config.version}: ReLU MLP {shape} trained on {trained_on} "
        f"({DATASET_NAME}, {DATASET_LICENCE}). Input '{INPUT_NAME}': raw pixels float32 [N, 64] in 0..16 "
        f"(scaling folded into the first layer). Output '{config.output_kind}': {config.output_kind}."
    )


def _set_metadata(
    model: onnx.ModelProto,
    config: TrainConfig,
    labels: tuple[str, ...],
    accuracy: float,
    class_mix: dict[str, float],
) -> None:
    from onnx import helper

    input_spec = {
        "name": INPUT_NAME,
        "shape": [None, NUM_FEATURES],
        "dtype": "float32",
        "value_range": [0, int(PIXEL_MAX)],
        "layout": "8x8 grayscale, row-major",
    }
    dataset = {
        "name": DATASET_NAME,
        "licence": DATASET_LICENCE,
        "source": "sklearn.datasets.load_digits",
        "split_seed": SPLIT_SEED,
        "test_fraction": TEST_FRACTION,
    }
    props = {
        "labels": json.dumps(list(labels)),
        "input_spec": json.dumps(input_spec),
        "output_kind": config.output_kind,
        "model_name": config.name,
        "model_version": config.version,
        "heldout_accuracy": f"{accuracy:.6f}",
        "reference_class_mix": json.dumps(class_mix),
        "dataset": json.dumps(dataset),
        "seed": str(config.seed),
        "train_config": config.to_json(),
    }
    helper.set_model_props(model, dict(sorted(props.items())))


def _set_health_reference(model: onnx.ModelProto, path: Path, output_kind: OutputKind, split: DigitsSplit) -> None:
    """Add `health_reference`: held-out inputs and the probabilities this very graph gives them."""
    from onnx import helper

    step = max(1, len(split.X_test) // HEALTH_REFERENCE_ROWS)
    inputs = np.ascontiguousarray(split.X_test[::step][:HEALTH_REFERENCE_ROWS], dtype=np.float32)
    (scores,) = _session(model.SerializeToString(), path).run(None, {INPUT_NAME: inputs})
    scores = softmax(scores, np.float64) if output_kind == "logits" else np.asarray(scores, dtype=np.float64)
    reference = {"inputs": inputs.tolist(), "probabilities": np.round(scores, 6).tolist()}
    props = {p.key: p.value for p in model.metadata_props}
    props["health_reference"] = json.dumps(reference)
    helper.set_model_props(model, dict(sorted(props.items())))


def _class_mix(predictions: NDArray[np.int64], labels: tuple[str, ...]) -> dict[str, float]:
    counts = np.bincount(predictions, minlength=len(labels))
    return {label: round(float(count) / len(predictions), 6) for label, count in zip(labels, counts, strict=True)}


def _session(model_bytes: bytes, path: Path) -> Any:
    """A one-thread CPU session of a model's bytes (`path`: the file they are or will be, for errors)."""
    session, _ = open_session(path, error=ModelFileError, data=model_bytes)
    return session


def _predict(model_bytes: bytes, path: Path, features: NDArray[np.float32]) -> NDArray[np.int64]:
    (scores,) = _session(model_bytes, path).run(None, {INPUT_NAME: np.ascontiguousarray(features, dtype=np.float32)})
    return np.asarray(np.argmax(scores, axis=1), dtype=np.int64)


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
