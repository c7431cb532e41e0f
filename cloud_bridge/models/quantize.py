"""INT8 static quantization of a float ONNX classifier, calibrated and judged on real data.

`cloud-bridge models quantize PATH --calibration digits|DIR --out OUT [--max-accuracy-drop 0.01]
[--register --name N --version V --config cloud.toml]`

* Calibration feeds ONNX Runtime's `quantize_static` real inputs: the digits *training* split that
  `demokit.models.load_split` trains on, or every `.npy` file of a directory (arrays of
  `[N, features]` or `[features]`). Never random tensors: activation ranges fitted on noise do not
  match what the model sees in the field, and the int8 model's accuracy shows it.
* Format: **QOperator** with per-tensor weights by default. It writes the integer kernels
  (QLinearMatMul/QGemm, DynamicQuantizeLinear-free) into the file, so the CPU execution provider
  runs them directly instead of having to fuse QuantizeLinear/DequantizeLinear pairs at session load.
  Measured on the demo models (2-vCPU VM, batch 1): the cloud MLP 205 KB -> 55 KB at 16.9 us vs
  17.5 us float, QDQ per-channel 62 KB at 32.8 us; per-channel weights gained no accuracy on these
  models and cost latency. `--format qdq` remains for accelerator EPs (TensorRT, QNN) that want QDQ.
* Evaluation runs the float and the int8 file side by side on the held-out split (or an `.npz`
  with arrays `x` and `y`): file size, accuracy and batch-1 latency p50. `quantize` measures and
  does not judge: the command (cloud_bridge/cli/models.py) prints the table and refuses a drop in
  accuracy beyond `--max-accuracy-drop` (exit 3, OUT deleted, nothing registered).
* The float file is loaded and checked as every program loads a model (common/onnx.py): a file that
  is not a classifier, or takes other than float32 `[N, features]` inputs, is refused (exit 2).
* The int8 file keeps the float model's metadata_props (labels, input spec, output kind, ...);
  `model_version` becomes `V` (or `<float version>+int8`), `heldout_accuracy` and
  `reference_class_mix` are re-measured on the int8 model, and `quantization` records how it was made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from cloud_bridge.errors import QuantizeError
from common.numeric import softmax
from common.onnx import OnnxModel, load_model, open_session
from schemas.modelcard import HealthReference, ModelCard, OutputKind

log = logging.getLogger(__name__)

QuantFormatName = Literal["qoperator", "qdq"]
_BATCH = 64
_LATENCY_RUNS = 500
_WARMUP_RUNS = 50


@dataclass(frozen=True)
class EvalSet:
    """Labelled inputs to judge a model on; `y` holds class indices into the model's outputs."""

    x: NDArray[np.float32]
    y: NDArray[np.int64]
    source: str


@dataclass(frozen=True)
class ModelReport:
    path: Path
    version: str
    size_bytes: int
    accuracy: float
    latency_p50_us: float


@dataclass(frozen=True)
class QuantizeResult:
    float_model: ModelReport
    int8_model: ModelReport
    calibration_source: str
    calibration_samples: int

    @property
    def accuracy_drop(self) -> float:
        return self.float_model.accuracy - self.int8_model.accuracy


@dataclass(frozen=True)
class QuantizeOptions:
    source: Path
    out: Path
    calibration: str
    evaluation: str = "digits"
    quant_format: QuantFormatName = "qoperator"
    per_channel: bool = False
    version: str | None = None


# ---- data ---------------------------------------------------------------------------------------
def load_calibration(spec: str, features: int) -> tuple[NDArray[np.float32], str]:
    """The calibration inputs named by `spec`: "digits" (the training split) or a directory of .npy."""
    if spec == "digits":
        from demokit.models import load_split

        x = np.asarray(load_split().X_train, dtype=np.float32)
        return _check_features(x, features, "the digits training split"), "digits:train"
    directory = Path(spec)
    if not directory.is_dir():
        raise QuantizeError(f"--calibration {spec!r} is neither 'digits' nor a directory of .npy files")
    files = sorted(directory.glob("*.npy"))
    if not files:
        raise QuantizeError(f"--calibration directory {directory} holds no .npy files: save real inputs there")
    arrays = [_load_npy(path, features) for path in files]
    return np.ascontiguousarray(np.concatenate(arrays), dtype=np.float32), f"dir:{directory} ({len(files)} files)"


def _load_npy(path: Path, features: int) -> NDArray[np.float32]:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise QuantizeError(f"calibration file {path} is not a readable .npy array: {exc}") from None
    if not np.issubdtype(array.dtype, np.number):
        raise QuantizeError(f"calibration file {path} has dtype {array.dtype}: save numeric inputs")
    if array.ndim not in (1, 2) or array.shape[-1] != features:
        raise QuantizeError(f"calibration file {path} has shape {array.shape}: save [N, {features}] or [{features}]")
    return _check_features(np.asarray(array, dtype=np.float32).reshape(-1, features), features, str(path))


def _check_features(x: NDArray[np.float32], features: int, where: str) -> NDArray[np.float32]:
    if x.ndim != 2 or x.shape[1] != features or x.shape[0] == 0:
        raise QuantizeError(f"{where} has shape {x.shape}: the model takes [N, {features}] inputs")
    if not np.all(np.isfinite(x)):
        raise QuantizeError(f"{where} contains NaN or infinite values: calibration needs real, finite inputs")
    return x


def load_evaluation(spec: str, features: int) -> EvalSet:
    """The held-out set named by `spec`: "digits" (the demo models' test split) or an .npz with x and y."""
    if spec == "digits":
        from demokit.models import load_split

        split = load_split()
        x = _check_features(np.asarray(split.X_test, dtype=np.float32), features, "the digits held-out split")
        return EvalSet(x=x, y=np.asarray(split.y_test, dtype=np.int64), source="digits:test")
    path = Path(spec)
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = np.asarray(data["x"], dtype=np.float32), np.asarray(data["y"], dtype=np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise QuantizeError(f"--eval {spec!r}: need 'digits' or an .npz with arrays 'x' and 'y' ({exc})") from None
    x = _check_features(x.reshape(len(y), -1), features, str(path))
    return EvalSet(x=x, y=y, source=f"npz:{path}")


class _Calibration:
    """Feeds `quantize_static` the calibration inputs in batches (its CalibrationDataReader protocol)."""

    def __init__(self, input_name: str, x: NDArray[np.float32]) -> None:
        self._batches: Iterator[dict[str, NDArray[np.float32]]] = iter(
            [{input_name: x[i : i + _BATCH]} for i in range(0, len(x), _BATCH)]
        )

    def get_next(self) -> dict[str, NDArray[np.float32]] | None:
        return next(self._batches, None)


# ---- models ---------------------------------------------------------------------------------------
def _session(path: Path) -> ort.InferenceSession:
    """A one-thread CPU session, like the edge's: thread hand-offs cost more than they save on tiny models."""
    session, _ = open_session(path, error=QuantizeError)
    return session


def load_float_model(path: Path) -> tuple[OnnxModel, int]:
    """The float classifier to quantize and its per-sample feature count; only `[N, features]`
    float32 inputs can be calibrated and judged on the data sets `quantize` reads."""
    model = load_model(path, error=QuantizeError)
    sig = model.signature
    if len(sig.feature_shape) != 1 or sig.input_dtype != np.float32:
        raise QuantizeError(
            f"{path} input {sig.input_name!r} is {sig.input_dtype} of shape {list(sig.input_shape)}: "
            "quantize supports float32 [N, features] models"
        )
    return model, sig.feature_shape[0]


def predict(path: Path, x: NDArray[np.float32]) -> NDArray[np.int64]:
    session = _session(path)
    (scores,) = session.run(None, {session.get_inputs()[0].name: x})[:1]
    return np.asarray(np.argmax(scores, axis=1), dtype=np.int64)


def latency_p50_us(path: Path, sample: NDArray[np.float32], runs: int = _LATENCY_RUNS) -> float:
    """Median wall time of one batch-1 run, in microseconds."""
    session = _session(path)
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(sample.reshape(1, -1), dtype=np.float32)}
    for _ in range(_WARMUP_RUNS):
        session.run(None, feed)
    times: list[int] = []
    for _ in range(runs):
        started = time.perf_counter_ns()
        session.run(None, feed)
        times.append(time.perf_counter_ns() - started)
    return statistics.median(times) / 1000.0


def int8_version(float_version: str) -> str:
    """Mark a quantized build: semver build metadata `+int8` (or `.int8` appended to existing metadata)."""
    return f"{float_version}.int8" if "+" in float_version else f"{float_version}+int8"


def _report(path: Path, version: str, data: EvalSet) -> ModelReport:
    accuracy = float(np.mean(predict(path, data.x) == data.y))
    return ModelReport(path, version, path.stat().st_size, accuracy, latency_p50_us(path, data.x[0]))


# ---- quantize -------------------------------------------------------------------------------------
def quantize(options: QuantizeOptions) -> QuantizeResult:
    """Quantize `options.source` to `options.out` and measure both; does not judge the budget."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    source, features = load_float_model(options.source)
    input_name, card = source.signature.input_name, source.card
    calibration, calibration_source = load_calibration(options.calibration, features)
    evaluation = load_evaluation(options.evaluation, features)
    float_version = card.version
    version = options.version or int8_version(float_version)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    partial = options.out.with_name(options.out.name + ".partial")
    quantize_static(
        str(options.source),
        str(partial),
        _Calibration(input_name, calibration),
        quant_format=QuantFormat.QOperator if options.quant_format == "qoperator" else QuantFormat.QDQ,
        per_channel=options.per_channel,
        # U8 activations, S8 weights: the combination ORT's x86/ARM int8 GEMM kernels are built for.
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    float_report = _report(options.source, float_version, evaluation)
    predictions = predict(partial, evaluation.x)
    int8_accuracy = float(np.mean(predictions == evaluation.y))
    provenance = {
        "format": options.quant_format,
        "per_channel": options.per_channel,
        "activations": "uint8",
        "weights": "int8",
        "calibration": calibration_source,
        "calibration_samples": len(calibration),
        "evaluation": evaluation.source,
        "float_version": float_version,
        "float_sha256": hashlib.sha256(options.source.read_bytes()).hexdigest(),
        "float_accuracy": round(float_report.accuracy, 6),
        "int8_accuracy": round(int8_accuracy, 6),
    }
    _write_metadata(partial, card, version, int8_accuracy, predictions, provenance)
    os.replace(partial, options.out)
    int8_report = _report(options.out, version, evaluation)
    return QuantizeResult(float_report, int8_report, calibration_source, len(calibration))


def _write_metadata(
    path: Path,
    card: ModelCard,
    version: str,
    accuracy: float,
    predictions: NDArray[np.int64],
    provenance: dict[str, Any],
) -> None:
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    props = dict(card.metadata)
    # quantize_static keeps metadata_props today; merging the float file's props keeps them if it stops.
    props.update({p.key: p.value for p in model.metadata_props})
    props["model_version"] = version
    props["heldout_accuracy"] = f"{accuracy:.6f}"
    props["quantization"] = json.dumps(provenance, sort_keys=True)
    if card.health_reference is not None:
        props["health_reference"] = _health_reference(path, card.health_reference, card.output_kind)
    # Labels as every reader sees them: the file's own, else "0".."C-1" (schemas/modelcard.py).
    counts = np.bincount(predictions, minlength=len(card.labels))
    mix = {label: round(float(n) / len(predictions), 6) for label, n in zip(card.labels, counts, strict=False)}
    props["reference_class_mix"] = json.dumps(mix)
    del model.metadata_props[:]
    helper.set_model_props(model, dict(sorted(props.items())))
    onnx.save(model, str(path))


def _health_reference(path: Path, reference: HealthReference, output_kind: OutputKind) -> str:
    """Re-run the OTA health-check reference inputs through the int8 model: a device compares the
    installed model's outputs with these, and int8 outputs differ slightly from the float ones."""
    session = _session(path)
    feed = {session.get_inputs()[0].name: np.asarray(reference.inputs, dtype=np.float32)}
    (scores,) = session.run(None, feed)[:1]
    probs = softmax(scores, np.float64) if output_kind == "logits" else np.asarray(scores, dtype=np.float64)
    # Laid out as demokit/export.py writes it.
    return json.dumps({"inputs": reference.inputs, "probabilities": np.round(probs, 6).tolist()})
