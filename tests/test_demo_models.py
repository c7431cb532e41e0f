"""The exported demo models, checked by running the real .onnx files in ONNX Runtime."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from numpy.typing import NDArray

from demokit.dataset import DigitsSplit
from demokit.models import (
    DemoModel,
    build_demo_models,
    build_edge_model,
    main,
    read_model_card,
)
from schemas.modelcard import DatasetRecord, InputSpec

REQUIRED_KEYS = {
    "labels",
    "input_spec",
    "output_kind",
    "model_name",
    "model_version",
    "heldout_accuracy",
    "reference_class_mix",
    "dataset",
    "seed",
}
DIGIT_LABELS = [str(digit) for digit in range(10)]


def _session(model: DemoModel) -> Any:
    return ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])


def _run(model: DemoModel, features: NDArray[np.float32]) -> NDArray[np.float32]:
    (output,) = _session(model).run(None, {"input": np.ascontiguousarray(features, dtype=np.float32)})
    return np.asarray(output, dtype=np.float32)


def _accuracy(model: DemoModel, split: DigitsSplit) -> float:
    return float(np.mean(np.argmax(_run(model, split.X_test), axis=1) == split.y_test))


def test_accuracy_floors_and_cloud_beats_edge(demo_models: dict[str, DemoModel], digits: DigitsSplit) -> None:
    edge = _accuracy(demo_models["edge"], digits)
    cloud = _accuracy(demo_models["cloud"], digits)
    # The edge model is deliberately modest (so some inputs get escalated), the cloud one strong.
    assert 0.93 <= edge < 0.97
    assert cloud >= 0.975
    assert cloud > edge
    for model, measured in ((demo_models["edge"], edge), (demo_models["cloud"], cloud)):
        assert model.heldout_accuracy == pytest.approx(measured, abs=1e-6)
        assert read_model_card(model.path).heldout_accuracy == pytest.approx(measured, abs=1e-6)


@pytest.mark.parametrize(
    ("kind", "name", "output_kind"),
    [("edge", "digits-edge", "logits"), ("cloud", "digits-cloud", "probabilities")],
)
def test_metadata_present_and_parseable(
    demo_models: dict[str, DemoModel], digits: DigitsSplit, kind: str, name: str, output_kind: str
) -> None:
    model = demo_models[kind]
    card = read_model_card(model.path)
    assert card.metadata.keys() >= REQUIRED_KEYS and all(card.declares(key) for key in REQUIRED_KEYS)
    assert json.loads(card.metadata["labels"]) == DIGIT_LABELS and card.labels == tuple(DIGIT_LABELS)
    assert card.input_spec == InputSpec(
        name="input", shape=[None, 64], dtype="float32", value_range=[0, 16], layout="8x8 grayscale, row-major"
    )
    assert card.output_kind == output_kind
    assert (card.name, card.version) == (name, "1.0.0")
    assert card.seed == 0
    assert isinstance(card.dataset, DatasetRecord) and card.dataset.licence == "CC BY 4.0"
    assert card.dataset.name is not None and "digits" in card.dataset.name
    assert card.quantization is None  # a float build
    assert card.health_reference is not None and len(card.health_reference.probabilities) == 8
    assert name in _session(model).get_modelmeta().description

    mix = card.reference_class_mix
    assert mix is not None and list(mix) == DIGIT_LABELS
    predicted = np.argmax(_run(model, digits.X_test), axis=1)
    expected = np.bincount(predicted, minlength=10) / len(predicted)
    np.testing.assert_allclose([mix[label] for label in DIGIT_LABELS], expected, atol=1e-6)

    assert (model.kind, model.name, model.version) == (kind, name, "1.0.0")
    assert model.path.name == f"{name}-1.0.0.onnx"
    assert model.labels == tuple(DIGIT_LABELS)
    assert model.sha256 == hashlib.sha256(model.path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["edge", "cloud"])
def test_graph_io_matches_declared_spec(demo_models: dict[str, DemoModel], kind: str) -> None:
    session = _session(demo_models[kind])
    card = read_model_card(demo_models[kind].path)
    (graph_input,) = session.get_inputs()
    (graph_output,) = session.get_outputs()
    assert card.input_spec is not None and graph_input.name == card.input_spec.name
    assert graph_input.type == "tensor(float)"
    assert isinstance(graph_input.shape[0], str)  # a named, dynamic batch dimension
    assert graph_input.shape[1] == 64
    assert graph_output.name == card.output_kind
    assert graph_output.shape[1] == 10


def test_output_kinds_are_as_declared(demo_models: dict[str, DemoModel], digits: DigitsSplit) -> None:
    probabilities = _run(demo_models["cloud"], digits.X_test)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert probabilities.min() >= 0.0
    assert probabilities.max() <= 1.0

    logits = _run(demo_models["edge"], digits.X_test)
    assert np.abs(logits.sum(axis=1) - 1.0).max() > 0.5
    assert logits.min() < 0.0


def test_input_is_raw_pixels(demo_models: dict[str, DemoModel], digits: DigitsSplit) -> None:
    # Scaling lives inside the graph: callers who pre-scale to 0..1 feed the wrong thing.
    edge = demo_models["edge"]
    raw = np.mean(np.argmax(_run(edge, digits.X_test), axis=1) == digits.y_test)
    prescaled = np.mean(np.argmax(_run(edge, digits.X_test / 16.0), axis=1) == digits.y_test)
    assert raw > prescaled + 0.3


@pytest.mark.parametrize("kind", ["edge", "cloud"])
def test_dynamic_batch_gives_same_rows(demo_models: dict[str, DemoModel], digits: DigitsSplit, kind: str) -> None:
    session = _session(demo_models[kind])
    batch = np.ascontiguousarray(digits.X_test[:64])
    (together,) = session.run(None, {"input": batch})
    one_by_one = np.concatenate([session.run(None, {"input": batch[i : i + 1]})[0] for i in range(64)])
    assert together.shape == (64, 10)
    np.testing.assert_allclose(one_by_one, together, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(one_by_one, axis=1), np.argmax(together, axis=1))


def test_rebuild_is_byte_identical(demo_models: dict[str, DemoModel], tmp_path: Path) -> None:
    rebuilt = build_demo_models(tmp_path, seed=0)
    for kind in ("edge", "cloud"):
        assert rebuilt[kind].path.parent == tmp_path
        assert rebuilt[kind].path.read_bytes() == demo_models[kind].path.read_bytes()
        assert rebuilt[kind].sha256 == demo_models[kind].sha256


def test_matching_files_are_reused(demo_models: dict[str, DemoModel]) -> None:
    out_dir = demo_models["edge"].path.parent
    before = {kind: model.path.stat().st_mtime_ns for kind, model in demo_models.items()}
    again = build_demo_models(out_dir, seed=0)
    assert again == demo_models
    assert {kind: model.path.stat().st_mtime_ns for kind, model in again.items()} == before


def test_mismatching_or_broken_files_are_rebuilt(demo_models: dict[str, DemoModel], tmp_path: Path) -> None:
    edge_file = tmp_path / demo_models["edge"].path.name
    shutil.copyfile(demo_models["edge"].path, edge_file)
    other_seed = build_edge_model(tmp_path, "1.0.0", seed=1)
    assert other_seed.path == edge_file
    assert read_model_card(edge_file).seed == 1
    assert other_seed.sha256 != demo_models["edge"].sha256

    edge_file.write_bytes(b"not an onnx model")
    repaired = build_edge_model(tmp_path, "1.0.0", seed=0)
    assert repaired.path.read_bytes() == demo_models["edge"].path.read_bytes()


def test_edge_variants_for_rollouts(demo_models: dict[str, DemoModel], digits: DigitsSplit, tmp_path: Path) -> None:
    better = build_edge_model(tmp_path, "1.1.0", hidden=(32,))
    bad = build_edge_model(tmp_path, "0.9.0-bad", shuffle_labels=True)
    assert better.path.name == "digits-edge-1.1.0.onnx"
    assert read_model_card(better.path).version == "1.1.0"
    assert _accuracy(better, digits) > _accuracy(demo_models["edge"], digits)
    assert _accuracy(bad, digits) < 0.3
    assert bad.heldout_accuracy == pytest.approx(_accuracy(bad, digits), abs=1e-6)
    assert read_model_card(bad.path).output_kind == "logits"


def test_cli_prints_table(demo_models: dict[str, DemoModel], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(demo_models["edge"].path.parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    for model in demo_models.values():
        (row,) = [line for line in lines if line.startswith(f"{model.name} {model.version}")]
        assert f"{model.heldout_accuracy * 100:.2f}%" in row
        assert row.endswith("µs")


def test_cli_help_describes_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--seed", "--edge-version", "--edge-hidden", "--shuffle-labels"):
        assert option in text


@pytest.mark.parametrize(("seed", "test_fraction"), [(0, 0.3), (1, 0.3), (7, 0.25), (3, 0.5), (42, 0.1)])
def test_digits_split_is_scikit_learns_without_importing_it(seed: int, test_fraction: float) -> None:
    """demokit reads and splits the digits with numpy (so a replaying node loads no scikit-learn),
    and gets exactly the rows and order `train_test_split` gives: models built before still see
    the same held-out set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from demokit.dataset import load_digits_arrays, load_digits_split

    bunch = load_digits()
    features, targets = load_digits_arrays()
    assert np.array_equal(features, bunch.data.astype(np.float32)) and np.array_equal(targets, bunch.target)
    X_train, X_test, y_train, y_test = train_test_split(
        features, targets, test_size=test_fraction, stratify=targets, random_state=seed
    )
    split = load_digits_split(seed=seed, test_fraction=test_fraction)
    assert np.array_equal(split.X_train, X_train) and np.array_equal(split.y_train, y_train)
    assert np.array_equal(split.X_test, X_test) and np.array_equal(split.y_test, y_test)
    assert split.X_test.dtype == np.float32 and split.y_test.dtype == np.int64


def test_digits_file_missing_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without scikit-learn installed (a device without the demo extra) the error says what to install."""
    import importlib.util

    from demokit import dataset

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match=r"pip install -e '\.\[demo\]'"):
        dataset.digits_file()
