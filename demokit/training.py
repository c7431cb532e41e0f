"""Training the demo MLPs: scikit-learn on the digits, weights folded so the model takes raw pixels.

`TrainConfig` is everything that determines a model file's bytes; it is recorded in the file
(`train_config` metadata), and a cached file whose record matches is reused instead of retrained.

Calibration (`calibrate`, on for the edge models): an MLP stopped early with L2 is under-confident.
The demo edge model was right on 95.6% of held-out digits while its mean top-1 probability was
0.914, so 14% of clean inputs fell under the 0.8 escalation threshold although 99.4% of those
above it were right: bytes spent on answers the edge had. Temperature scaling (Guo et al., "On
Calibration of Modern Neural Networks", 2017) divides the logits by one T fitted to minimise the
negative log-likelihood of out-of-fold predictions (5 folds of the training data, never the
held-out split); T is folded into the last layer, so the graph is unchanged and the top-1 class,
hence accuracy, is the same. Measured on the demo edge model: T = 0.6-0.7, clean escalations
14% -> ~8%, accuracy of the answers kept at the edge 0.994 -> 0.988.
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
BUILDER_REVISION = 3
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
    calibrate: bool = False  # temperature scaling of the logits (module docstring)
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


@dataclass(frozen=True)
class Trained:
    layers: list[Layer]
    temperature: float | None  # the fitted T folded into the last layer, if calibrated


CALIBRATION_FOLDS = 5
_TEMPERATURES = np.geomspace(0.2, 5.0, 161)


def train(config: TrainConfig, split: DigitsSplit, groups: NDArray[np.int64] | None = None) -> Trained:
    """Fit on `split`'s training part. `groups` (one id per training row) keeps rows that are copies
    of one sample (an oversampled field sample) in one calibration fold, so T is fitted on
    predictions for samples the fold's model never saw."""
    # One global scale (pixels / 16), not per-pixel standardisation: border pixels are almost always
    # blank, and dividing by their tiny spread made a little noise or a 10° rotation wreck accuracy.
    mean = np.zeros(NUM_FEATURES, dtype=np.float64)
    std = np.full(NUM_FEATURES, PIXEL_MAX, dtype=np.float64)
    x = (np.asarray(split.X_train, dtype=np.float64) - mean) / std
    targets = np.asarray(split.y_train)
    if config.shuffle_labels:
        targets = np.random.default_rng(config.seed).permutation(targets)
    weights, biases = _fit(config, x, targets)
    temperature = None
    if config.calibrate:
        temperature = fit_temperature(config, x, targets, groups)
        weights[-1] = weights[-1] / temperature
        biases[-1] = biases[-1] / temperature
    return Trained(_fold_scaling(weights, biases, mean, std), temperature)


def _fit(
    config: TrainConfig, x: NDArray[np.float64], y: NDArray[np.int64]
) -> tuple[list[NDArray[np.float64]], list[NDArray[np.float64]]]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

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
        classifier.fit(x, y)
    weights = [np.asarray(w, dtype=np.float64) for w in classifier.coefs_]
    biases = [np.asarray(b, dtype=np.float64) for b in classifier.intercepts_]
    return weights, biases


def _logits(
    weights: list[NDArray[np.float64]], biases: list[NDArray[np.float64]], x: NDArray[np.float64]
) -> NDArray[np.float64]:
    for w, b in zip(weights[:-1], biases[:-1], strict=True):
        x = np.maximum(x @ w + b, 0.0)
    return np.asarray(x @ weights[-1] + biases[-1])


def fit_temperature(
    config: TrainConfig,
    x: NDArray[np.float64],
    y: NDArray[np.int64],
    groups: NDArray[np.int64] | None = None,
) -> float:
    """The T minimising the NLL of softmax(logits / T) over out-of-fold logits (CALIBRATION_FOLDS
    models of `config` on the other folds); fold membership by group, seeded by `config.seed`."""
    ids = np.arange(len(y)) if groups is None else np.asarray(groups)
    unique, inverse = np.unique(ids, return_inverse=True)
    folds = (np.random.default_rng(config.seed).permutation(len(unique)) % CALIBRATION_FOLDS)[inverse]
    logits = np.empty((len(y), int(y.max()) + 1), dtype=np.float64)
    for k in range(CALIBRATION_FOLDS):
        held = folds == k
        weights, biases = _fit(config, x[~held], y[~held])
        out = _logits(weights, biases, x[held])
        logits[held] = np.pad(out, ((0, 0), (0, logits.shape[1] - out.shape[1])), constant_values=-np.inf)
    scaled = logits[None, :, :] / _TEMPERATURES[:, None, None]
    scaled = scaled - scaled.max(axis=2, keepdims=True)
    log_z = np.log(np.exp(scaled).sum(axis=2))
    nll = (log_z - scaled[:, np.arange(len(y)), y]).mean(axis=1)
    return float(_TEMPERATURES[int(np.argmin(nll))])


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
