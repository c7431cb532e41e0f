"""Tiny ONNX files for the tests of what loads as a classifier (common/onnx.py and its callers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save(graph: onnx.GraphProto, path: Path, props: dict[str, str] | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if props:
        helper.set_model_props(model, props)
    onnx.save(model, str(path))
    return path


def linear(
    path: Path,
    *,
    softmax: bool = False,
    props: dict[str, str] | None = None,
    classes: int = 3,
    batch: int | str = "N",
) -> Path:
    """A [batch, 4] -> [batch, classes] Gemm, optionally followed by a softmax."""
    weight = np.arange(4 * classes, dtype=np.float32).reshape(4, classes) / 10
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["scores"])]
    out = "scores"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["scores"], ["probs"], axis=1))
        out = "probs"
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, classes])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.zeros(classes, np.float32), "B")],
    )
    return save(graph, path, props)


def image_to_image(path: Path) -> Path:
    """A [N, 3, 8, 8] -> [N, 3, 8, 8] "denoiser": a valid model, but no classifier."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["image"], ["out"])],
        "denoise",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, 8, 8])],
    )
    return save(graph, path)


def identity(path: Path, inputs: list[tuple[str, int, list[int | str]]]) -> Path:
    """A graph passing its first input through (the signature checks never run it)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [inputs[0][0]], ["out"])],
        "g",
        [helper.make_tensor_value_info(name, kind, shape) for name, kind, shape in inputs],
        [helper.make_tensor_value_info("out", inputs[0][1], inputs[0][2])],
    )
    return save(graph, path)


def conv_head(path: Path, classes: int = 5) -> Path:
    """A [N, classes] -> [N, classes, 1, 1] graph: class scores shaped like a convolutional head's."""
    graph = helper.make_graph(
        [helper.make_node("Unsqueeze", ["x", "axes"], ["scores"])],
        "conv_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", classes])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", classes, 1, 1])],
        [numpy_helper.from_array(np.array([2, 3], np.int64), "axes")],
    )
    return save(graph, path)


def flatten(path: Path) -> Path:
    """A [N, 1, 2, 2] -> [N, 4] graph: class scores of a picture, not of a feature row."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["scores"])],
        "picture",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 2, 2])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 4])],
    )
    return save(graph, path)
