"""The cloud reads model files the way the edge does (common/onnx.py): what it refuses, with one line
naming the file (`models add`, the escalation model at bridge start, `[drift] reference_models`,
`models quantize`), and what it now serves (labels by default, the output kind found by running the
model, class scores shaped [N, C, 1, 1], a fixed batch size)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

from cloud_bridge.cli import main as cli_main
from cloud_bridge.drift.store import load_reference_mixes
from cloud_bridge.errors import ModelError, ModelStoreError, ReferenceModelError
from cloud_bridge.escalation.escalator import CloudModel
from cloud_bridge.models.store import ModelStore
from cloud_bridge.registry import Registry
from common.numeric import softmax
from tests.onnx_builders import conv_head, flatten, identity, image_to_image, linear

BRIDGE = [sys.executable, "-m", "cloud_bridge.cli"]
X = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, -1.0, 0.5, 2.0], [3.0, 0.0, 0.0, 1.0]], dtype=np.float32)


def not_onnx(path: Path) -> Path:
    path.write_bytes(b"this is a README, not a model\n")
    return path


def cli(tmp_path: Path, *args: str, config: str = "") -> subprocess.CompletedProcess[str]:
    """The real command in its own process: what an operator sees on stderr, and its exit code."""
    toml = tmp_path / "cloud.toml"
    toml.write_text(f'state_dir = "{tmp_path / "state"}"\n{config}', encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([*BRIDGE, *args, "--config", str(toml)], capture_output=True, text=True, timeout=60, env=env)


def refusal(done: subprocess.CompletedProcess[str]) -> str:
    """The command's error line, once it is clear the command failed with exit 1 and no traceback."""
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr.splitlines()[-1]


# What an operator may hand the cloud by mistake, and what the refusal must say.
NOT_CLASSIFIERS = pytest.mark.parametrize(
    ("make", "says"),
    [(not_onnx, "is not an ONNX model"), (image_to_image, "is not a classifier: its output 'out' has shape")],
)


@NOT_CLASSIFIERS
def test_models_add_refuses_a_file_that_is_not_a_classifier_in_one_line(
    tmp_path: Path, make: Callable[[Path], Path], says: str
) -> None:
    path = make(tmp_path / "candidate.onnx")
    done = cli(tmp_path, "models", "add", str(path), "--version", "1")
    line = refusal(done)
    assert done.stderr == line + "\n"
    assert line.startswith("cloud-bridge models add: ") and str(path) in line and says in line
    assert not list((tmp_path / "state" / "models").glob("*.onnx"))  # nothing copied into the store


@NOT_CLASSIFIERS
def test_the_bridge_does_not_start_with_an_escalation_model_that_is_not_a_classifier(
    tmp_path: Path, make: Callable[[Path], Path], says: str
) -> None:
    path = make(tmp_path / "cloud.onnx")
    line = refusal(cli(tmp_path, "run", config=f'\n[escalation]\nmodel = "{path}"\n'))
    assert line.startswith("cloud-bridge run: [escalation] model cannot be used: ")
    assert str(path) in line and says in line


def test_a_model_with_dynamic_feature_dims_is_refused_by_every_reader(tmp_path: Path) -> None:
    path = identity(tmp_path / "wide.onnx", [("x", TensorProto.FLOAT, ["N", "width"])])
    message = r"wide\.onnx input 'x' has dynamic feature dims .*only the batch may vary"
    with pytest.raises(ModelError, match=message):
        CloudModel(path)
    with pytest.raises(ReferenceModelError, match=r"^\[drift\] reference_models: model .*" + message):
        load_reference_mixes([path])


def test_reference_mixes_skip_a_model_without_one_and_refuse_one_that_is_no_classifier(tmp_path: Path) -> None:
    with_mix = linear(tmp_path / "a.onnx", props={"labels": '["x", "y", "z"]', "reference_class_mix": '{"x": 1}'})
    linear(tmp_path / "b.onnx")  # no reference_class_mix: skipped
    assert load_reference_mixes([tmp_path]) == {hashlib.sha256(with_mix.read_bytes()).hexdigest(): {"x": 1.0}}
    image_to_image(tmp_path / "c.onnx")
    with pytest.raises(ReferenceModelError, match=r"c\.onnx is not a classifier"):
        load_reference_mixes([tmp_path])


def test_quantize_refuses_what_it_cannot_calibrate_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for path, says in [
        (not_onnx(tmp_path / "notes.onnx"), "is not an ONNX model"),
        (image_to_image(tmp_path / "denoise.onnx"), "is not a classifier"),
        (flatten(tmp_path / "picture.onnx"), r"of shape \[-1, 1, 2, 2\]: quantize supports float32 \[N, features\]"),
    ]:
        code = cli_main(["models", "quantize", str(path), "--calibration", "digits", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2
        (line,) = err.splitlines()
        assert line.startswith("cloud-bridge models quantize: ") and str(path) in line
        assert re.search(says, line), line


async def test_the_store_registers_a_bare_classifier_with_default_labels_but_wants_a_version(tmp_path: Path) -> None:
    path = linear(tmp_path / "bare.onnx", classes=4)
    registry = Registry(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    await registry.create()
    try:
        store = ModelStore(tmp_path / "models", registry)
        with pytest.raises(ModelStoreError, match=r"bare\.onnx has no 'model_version' in its metadata: pass --version"):
            await store.add(path)
        record = await store.add(path, version="1")
        assert (record.name, record.labels, record.input_shape) == ("bare", ("0", "1", "2", "3"), (-1, 4))
        assert record.reference_mix == {}
    finally:
        await registry.close()


def test_the_cloud_model_detects_logits_and_names_classes_when_the_metadata_does_not(tmp_path: Path) -> None:
    path = linear(tmp_path / "bare.onnx")
    model = CloudModel(path)
    assert model.card.output_kind == "logits" and model.labels == ("0", "1", "2")
    assert (model.ref.name, model.ref.version) == ("bare", "0")
    predictions = model.predict(np.concatenate([model.prepare(row) for row in X]))
    expected = softmax(X @ (np.arange(12, dtype=np.float32).reshape(4, 3) / 10), np.float64)
    assert [p.index for p in predictions] == list(expected.argmax(axis=1))
    for p, row in zip(predictions, expected, strict=True):
        assert p.confidence == pytest.approx(row.max()) and p.label == str(p.index)
        assert [t.prob for t in p.topk] == pytest.approx(sorted(row, reverse=True))


def test_the_cloud_model_reads_n_c_1_1_scores_and_runs_a_fixed_batch_in_slices(tmp_path: Path) -> None:
    head = CloudModel(conv_head(tmp_path / "head.onnx", classes=4))
    assert [p.index for p in head.predict(X)] == list(X.argmax(axis=1))
    # Two inputs a run: three rows take two runs, the second padded; one row is padded too.
    fixed = CloudModel(linear(tmp_path / "two.onnx", softmax=True, batch=2))
    assert fixed.signature.batch == 2 and fixed.card.output_kind == "probabilities"
    batch = np.concatenate([fixed.prepare(row) for row in X])
    one_by_one = [fixed.predict(row[None])[0] for row in batch]
    assert fixed.predict(batch) == one_by_one
    assert [p.index for p in one_by_one] == [p.index for p in CloudModel(linear(tmp_path / "n.onnx")).predict(X)]
    with pytest.raises(ValueError, match="input has 5 values, the cloud model takes 4"):
        fixed.prepare(np.zeros(5, np.float32))
