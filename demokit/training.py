"""Training the demo MLPs: scikit-learn on the digits, weights folded so the model takes raw pixels.

`TrainConfig` is everything that determines a model file's bytes; it is recorded in the file
(`train_config` metadata), and a cached file whose record matches is reused instead of retrained.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import NDArray

from demokit.dataset import NUM_FEATURES, PIXEL_MAX, DigitsSplit
from schemas.modelcard import OutputKind

# Bump when training or export changes in a way that alters the files, so cached files are rebuilt.
BUILDER_REVISION = 2
# All models share one held-out set, whatever their training seed, so their accuracies compare and
# the replay source (which replays the test split) never shows a model its own training data.
SPLIT_SEED = 0
TEST_FRACTION = 0.3
L2_ALPHA = 1e-3


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
class Layer:
    weight: NDArray[np.float32]  # [in, out], used as Gemm(X, W) + b
    bias: NDArray[np.float32]


def model_file_name(name: str, version: str) -> str:
    return f"{name}-{version}.onnx"


def train(config: TrainConfig, split: DigitsSplit) -> list[Layer]:
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
) -> list[Layer]:
    # ((x - mean) / std) @ W + b == x @ (W / std[:, None]) + (b - (mean / std) @ W),
    # so the exported graph takes raw pixels.
    first_weight = weights[0] / std[:, None]
    first_bias = biases[0] - (mean / std) @ weights[0]
    folded = [(first_weight, first_bias), *zip(weights[1:], biases[1:], strict=True)]
    return [Layer(weight=w.astype(np.float32), bias=b.astype(np.float32)) for w, b in folded]
