"""The demo models as ONNX files: the graph of a trained MLP, the metadata_props it carries (read back
by common/onnx.py into a ModelCard), and running the bytes in ONNX Runtime.

The metadata is formatted exactly as it always was (JSON with the default separators, accuracy to
six decimals, sorted props): the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from common.numeric import softmax
from common.onnx import open_session
from demokit.dataset import DATASET_LICENCE, DATASET_NAME, NUM_FEATURES, PIXEL_MAX, DigitsSplit
from demokit.training import BUILDER_REVISION, SPLIT_SEED, TEST_FRACTION, Layer, TrainConfig
from schemas.modelcard import OutputKind

if TYPE_CHECKING:
    import onnx

OPSET = 17
# IR 8 is the revision that introduced opset 17; every onnxruntime >= 1.12 loads it.
IR_VERSION = 8
INPUT_NAME = "input"
# Held-out rows shipped as the OTA health-check reference (spread over the test split).
HEALTH_REFERENCE_ROWS = 8


class ModelFileError(Exception):
    """A model file the demo kit reads is not an ONNX classifier with valid metadata (the message says why)."""


def to_onnx(config: TrainConfig, layers: list[Layer], labels: tuple[str, ...]) -> onnx.ModelProto:
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


def _doc_string(config: TrainConfig, layers: list[Layer]) -> str:
    shape = "→".join([str(NUM_FEATURES), *(str(layer.bias.shape[0]) for layer in layers)])
    trained_on = "SHUFFLED labels (deliberately bad)" if config.shuffle_labels else "the digits train split"
    return (
        f"{config.name} {config.version}: ReLU MLP {shape} trained on {trained_on} "
        f"({DATASET_NAME}, {DATASET_LICENCE}). Input '{INPUT_NAME}': raw pixels float32 [N, 64] in 0..16 "
        f"(scaling folded into the first layer). Output '{config.output_kind}': {config.output_kind}."
    )


def set_metadata(
    model: onnx.ModelProto,
    config: TrainConfig,
    labels: tuple[str, ...],
    accuracy: float,
    class_mix: dict[str, float],
    *,
    temperature: float | None = None,
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
    if temperature is not None:  # the logits were divided by it (demokit/training.py, calibration)
        props["calibration"] = json.dumps({"method": "temperature", "temperature": round(temperature, 6)})
    helper.set_model_props(model, dict(sorted(props.items())))


def set_health_reference(model: onnx.ModelProto, path: Path, output_kind: OutputKind, split: DigitsSplit) -> None:
    """Add `health_reference`: held-out inputs and the probabilities this very graph gives them."""
    from onnx import helper

    step = max(1, len(split.X_test) // HEALTH_REFERENCE_ROWS)
    inputs = np.ascontiguousarray(split.X_test[::step][:HEALTH_REFERENCE_ROWS], dtype=np.float32)
    (scores,) = cpu_session(model.SerializeToString(), path).run(None, {INPUT_NAME: inputs})
    scores = softmax(scores, np.float64) if output_kind == "logits" else np.asarray(scores, dtype=np.float64)
    reference = {"inputs": inputs.tolist(), "probabilities": np.round(scores, 6).tolist()}
    props = {p.key: p.value for p in model.metadata_props}
    props["health_reference"] = json.dumps(reference)
    helper.set_model_props(model, dict(sorted(props.items())))


def class_mix(predictions: NDArray[np.int64], labels: tuple[str, ...]) -> dict[str, float]:
    counts = np.bincount(predictions, minlength=len(labels))
    return {label: round(float(count) / len(predictions), 6) for label, count in zip(labels, counts, strict=True)}


def cpu_session(model_bytes: bytes, path: Path) -> Any:
    """A one-thread CPU session of a model's bytes (`path`: the file they are or will be, for errors)."""
    opened, _ = open_session(path, error=ModelFileError, data=model_bytes)
    return opened


def predict(model_bytes: bytes, path: Path, features: NDArray[np.float32]) -> NDArray[np.int64]:
    (scores,) = cpu_session(model_bytes, path).run(None, {INPUT_NAME: np.ascontiguousarray(features, dtype=np.float32)})
    return np.asarray(np.argmax(scores, axis=1), dtype=np.int64)
