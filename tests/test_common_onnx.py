"""common/onnx.py: loading a classifier, refusing what is not one, and the one metadata reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

from common.onnx import CPU, card_from_metadata, load_model, read_card
from demokit.models import DemoModel
from edge_node.errors import ModelLoadError
from schemas.modelcard import UNVERSIONED, HealthReference, QuantizationRecord
from tests.onnx_builders import conv_head, identity, image_to_image, linear


class BadModel(Exception):
    """The error type a caller asks for: every refusal must come as this."""


def test_a_demo_model_loads_with_its_card_and_signature(demo_models: dict[str, DemoModel]) -> None:
    edge = demo_models["edge"]
    model = load_model(edge.path, error=BadModel)
    card, sig = model.card, model.signature
    assert (card.name, card.version, card.labels) == (edge.name, edge.version, edge.labels)
    assert card.output_kind == "logits" and card.declares("output_kind")
    assert card.heldout_accuracy == pytest.approx(edge.heldout_accuracy)
    assert isinstance(card.health_reference, HealthReference)
    assert sig.input_name == "input" and sig.feature_shape == (64,) and sig.input_dtype == np.float32
    assert sig.dynamic_batch and sig.input_shape == (-1, 64) and sig.classes == 10
    assert model.providers.active == (CPU,) and not model.providers.fallback
    assert read_card(edge.path, error=BadModel) == card


@pytest.mark.parametrize(
    "content",
    [b"hello, this is text", b"", b"\x89PNG\r\n\x1a\n0000", "half of a real model"],
)
def test_a_file_that_is_not_onnx_is_refused_as_such_with_its_path(
    demo_models: dict[str, DemoModel], tmp_path: Path, content: bytes | str
) -> None:
    path = tmp_path / "model.onnx"
    if isinstance(content, str):
        data = demo_models["edge"].path.read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(BadModel, match="is not an ONNX model") as caught:
        load_model(path, error=BadModel)
    assert str(path) in str(caught.value)
    # The program's own error type, whichever it is.
    with pytest.raises(ModelLoadError, match="is not an ONNX model"):
        load_model(path, error=ModelLoadError)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(BadModel, match=r"model file .*absent\.onnx does not exist"):
        load_model(tmp_path / "absent.onnx", error=BadModel)


def test_an_image_to_image_model_is_not_a_classifier(tmp_path: Path) -> None:
    path = image_to_image(tmp_path / "denoise.onnx")
    with pytest.raises(BadModel, match=r"denoise\.onnx is not a classifier: its output 'out' has shape"):
        load_model(path, error=BadModel)


def test_class_scores_shaped_n_c_1_1_are_a_classifier(tmp_path: Path) -> None:
    path = conv_head(tmp_path / "head.onnx")
    model = load_model(path, error=BadModel)
    assert model.signature.classes == 5 and model.card.labels == ("0", "1", "2", "3", "4")


def test_defaults_are_the_same_for_every_reader(tmp_path: Path) -> None:
    """No metadata at all: the name is the file's stem, the version UNVERSIONED, the labels number
    the classes, and the output kind is what running the model shows."""
    logits = load_model(linear(tmp_path / "bare-logits.onnx"), error=BadModel).card
    assert (logits.name, logits.version, logits.labels) == ("bare-logits", UNVERSIONED, ("0", "1", "2"))
    assert logits.output_kind == "logits" and not logits.declares("output_kind")
    assert logits.reference_class_mix is None and logits.health_reference is None and logits.quantization is None
    assert logits.heldout_accuracy is None and logits.metadata == {}
    probs = load_model(linear(tmp_path / "bare-probs.onnx", softmax=True), error=BadModel).card
    assert probs.output_kind == "probabilities"
    # The pure reader, on the same (empty) props, gives the same card.
    same = card_from_metadata(
        {}, path=tmp_path / "bare-logits.onnx", classes=3, error=BadModel, detected_output_kind="logits"
    )
    assert same == logits


@pytest.mark.parametrize(
    ("props", "message"),
    [
        ({"labels": "a,b,c"}, "metadata 'labels' must be a JSON list of class names"),
        ({"labels": "[]"}, "'labels' must be a non-empty list"),
        ({"labels": '["a", "b"]'}, "has 3 outputs but 2 labels"),
        ({"output_kind": "scores"}, "has output_kind 'scores': it must be 'logits' or 'probabilities'"),
        ({"health_reference": '{"inputs": [[1, 2, 3, 4]]}'}, "metadata 'health_reference' is not a valid"),
        ({"reference_class_mix": '{"a": "most"}'}, "metadata 'reference_class_mix' is not a valid"),
        ({"heldout_accuracy": "high"}, "metadata 'heldout_accuracy' is 'high', not a number"),
    ],
)
def test_bad_metadata_is_refused_naming_the_key(tmp_path: Path, props: dict[str, str], message: str) -> None:
    path = linear(tmp_path / "bad.onnx", props=props)
    with pytest.raises(BadModel, match=message):
        load_model(path, error=BadModel)


def test_a_quantized_models_record_and_every_prop_are_kept(tmp_path: Path) -> None:
    record = {
        "format": "qoperator",
        "per_channel": False,
        "activations": "uint8",
        "weights": "int8",
        "calibration": "digits:train",
        "calibration_samples": 1257,
        "evaluation": "digits:test",
        "float_version": "1.0.0",
        "float_sha256": "ab" * 32,
        "float_accuracy": 0.95,
        "int8_accuracy": 0.949,
    }
    props = {
        "model_name": "digits-edge",
        "model_version": "1.0.0+int8",
        "labels": json.dumps(["a", "b", "c"]),
        "output_kind": "logits",
        "quantization": json.dumps(record, sort_keys=True),
        "reference_class_mix": json.dumps({"a": 0.5, "b": 0.25, "c": 0.25}),
        "something_else": "kept verbatim",
    }
    card = load_model(linear(tmp_path / "int8.onnx", props=props), error=BadModel).card
    assert card.quantization == QuantizationRecord(**record)  # type: ignore[arg-type]
    assert card.reference_class_mix == {"a": 0.5, "b": 0.25, "c": 0.25}
    assert card.metadata == props and card.declares("model_version")


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            [("a", TensorProto.FLOAT, ["N", 4]), ("b", TensorProto.FLOAT, ["N", 4])],
            "must have exactly one input and an output",
        ),
        ([("x", TensorProto.STRING, ["N", 4])], "has type tensor\\(string\\), which cannot be fed"),
        ([("x", TensorProto.FLOAT, [])], "is a scalar; a batch dimension is needed"),
        ([("x", TensorProto.FLOAT, ["N", "width"])], "has dynamic feature dims .*only the batch may vary"),
    ],
)
def test_inputs_a_program_cannot_feed_are_refused(
    tmp_path: Path, inputs: list[tuple[str, int, list[int | str]]], message: str
) -> None:
    with pytest.raises(BadModel, match=message):
        load_model(identity(tmp_path / "odd.onnx", inputs), error=BadModel)
