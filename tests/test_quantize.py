"""INT8 quantization of the real demo models, calibrated on the real digits training split."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cloud_bridge.cli import main as cli_main
from cloud_bridge.errors import QuantizeError
from cloud_bridge.models.quantize import QuantizeOptions, load_calibration, quantize
from common.numeric import softmax
from demokit.dataset import DigitsSplit
from demokit.models import DemoModel, build_edge_model
from tests.config_files import write_bridge_config
from tests.processes import CLOUD_BRIDGE

# Generous: the module fixture trains two models first, slow on a loaded 2-core machine.
pytestmark = pytest.mark.timeout(300)

_INT8_OPS = {"QLinearMatMul", "QGemm", "MatMulInteger", "QuantizeLinear", "DequantizeLinear"}


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DemoModel]:
    """The demo edge model (its exact build config) and a wider MLP standing in for the cloud model,
    whose 256x128 training takes minutes on a loaded 2-core machine; both real, trained on digits."""
    out = tmp_path_factory.mktemp("quantize_models")
    return {
        "edge": build_edge_model(out, "1.0.0"),
        "cloud": build_edge_model(out, "1.0.0", hidden=(128,), name="digits-wide"),
    }


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLOUD_BRIDGE, *args], capture_output=True, text=True, timeout=90)


def run_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The same CLI entry point without a process start (imports cost seconds on a loaded machine)."""
    code = cli_main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def registered(tmp_path: Path) -> list[tuple[str, str]]:
    db = tmp_path / "state" / "registry.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            return [(str(n), str(v)) for n, v in conn.execute("SELECT name, version FROM models")]
        except sqlite3.OperationalError:
            return []


def test_wide_model_int8_is_smaller_loads_and_stays_within_budget(
    tmp_path: Path, demo_models: dict[str, DemoModel], digits: DigitsSplit
) -> None:
    source = demo_models["cloud"]
    out = tmp_path / "cloud-int8.onnx"
    result = quantize(QuantizeOptions(source=source.path, out=out, calibration="digits"))

    assert out.stat().st_size < source.path.stat().st_size / 2
    assert result.int8_model.size_bytes == out.stat().st_size
    # Really integer arithmetic, not a float copy.
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert ops & _INT8_OPS, ops
    # Loads in a fresh ORT session and scores like the report says, on the held-out split.
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (scores,) = session.run(None, {"input": np.asarray(digits.X_test)})
    accuracy = float(np.mean(np.argmax(scores, axis=1) == digits.y_test))
    assert accuracy == pytest.approx(result.int8_model.accuracy)
    assert result.float_model.accuracy == pytest.approx(source.heldout_accuracy)
    assert result.accuracy_drop <= 0.01
    assert result.int8_model.latency_p50_us > 0 and result.float_model.latency_p50_us > 0
    # Metadata kept, version marked, provenance recorded.
    meta = dict(session.get_modelmeta().custom_metadata_map)
    assert json.loads(meta["labels"]) == list(source.labels)
    assert meta["output_kind"] == "logits"
    assert meta["model_name"] == source.name
    assert meta["model_version"] == f"{source.version}+int8"
    assert float(meta["heldout_accuracy"]) == pytest.approx(accuracy, abs=1e-6)
    provenance = json.loads(meta["quantization"])
    assert provenance["calibration"] == "digits:train"
    assert provenance["calibration_samples"] == len(digits.X_train)
    assert provenance["float_sha256"] == source.sha256
    # The OTA health-check reference now holds the int8 model's own outputs (a device compares them).
    reference = json.loads(meta["health_reference"])
    (logits,) = session.run(None, {"input": np.asarray(reference["inputs"], dtype=np.float32)})
    np.testing.assert_allclose(reference["probabilities"], softmax(logits, np.float64), atol=1e-5)


def test_calibration_is_the_real_training_split(digits: DigitsSplit) -> None:
    x, source = load_calibration("digits", 64)
    assert source == "digits:train"
    np.testing.assert_array_equal(x, digits.X_train)


def test_calibration_dir_errors_name_the_file(tmp_path: Path, demo_models: dict[str, DemoModel]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QuantizeError, match=r"no \.npy files"):
        load_calibration(str(empty), 64)
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "wrong.npy", np.zeros((5, 63), dtype=np.float32))
    with pytest.raises(QuantizeError, match=r"wrong\.npy"):
        load_calibration(str(bad), 64)


def test_cli_quantizes_the_edge_model_and_registers_it(tmp_path: Path, demo_models: dict[str, DemoModel]) -> None:
    config = write_bridge_config(tmp_path)
    out = tmp_path / "edge-int8.onnx"
    done = run_cli(
        "models", "quantize", str(demo_models["edge"].path), "--calibration", "digits", "--out", str(out),
        "--register", "--config", str(config),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout and "batch-1 p50" in done.stdout and "size" in done.stdout
    assert out.exists() and out.stat().st_size < demo_models["edge"].path.stat().st_size
    assert registered(tmp_path) == [("digits-edge", "1.0.0+int8")]


def test_cli_refuses_an_impossible_budget(
    tmp_path: Path, demo_models: dict[str, DemoModel], capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_bridge_config(tmp_path)
    out = tmp_path / "edge-int8.onnx"
    code, _, err = run_in_process(
        capsys, "models", "quantize", str(demo_models["edge"].path), "--calibration", "digits", "--out", str(out),
        "--max-accuracy-drop", "-1", "--register", "--config", str(config),
    )  # fmt: skip
    assert code == 3
    assert "REFUSED" in err and "exceeds the budget" in err
    assert not out.exists()
    assert registered(tmp_path) == []


def test_cli_refuses_a_model_degraded_by_mismatched_calibration(
    tmp_path: Path, demo_models: dict[str, DemoModel], digits: DigitsSplit, capsys: pytest.CaptureFixture[str]
) -> None:
    # Real inputs, but scaled like a pipeline that forgot the model takes raw 0..16 pixels: the fitted
    # activation ranges are 16x too narrow and the int8 model saturates.
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    np.save(calibration / "train.npy", np.asarray(digits.X_train[:400]) / 16.0)
    out = tmp_path / "cloud-int8.onnx"
    code, out_text, err = run_in_process(
        capsys, "models", "quantize", str(demo_models["cloud"].path), "--calibration", str(calibration),
        "--out", str(out), "--register", "--config", str(write_bridge_config(tmp_path)),
    )  # fmt: skip
    assert code == 3, out_text + err
    assert "REFUSED" in err
    assert not out.exists()
    assert registered(tmp_path) == []


def test_cli_bad_calibration_exits_2(
    tmp_path: Path, demo_models: dict[str, DemoModel], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_in_process(
        capsys, "models", "quantize", str(demo_models["edge"].path), "--calibration", str(tmp_path / "nowhere"),
        "--out", str(tmp_path / "x.onnx"),
    )  # fmt: skip
    assert code == 2
    assert "neither 'digits' nor a directory" in err
