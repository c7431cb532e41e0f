"""Drift injection: transforms move the statistics the expected way and hurt the edge model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from demokit.dataset import DigitsSplit
from demokit.drift import DriftSpec, RotateBackend, add_noise, class_mix, class_mix_shift, rotate
from demokit.models import DemoModel


def _edge_confidence(
    model: DemoModel, features: NDArray[np.float32], labels: NDArray[np.int64]
) -> tuple[float, float, float]:
    """Accuracy, mean top-1 softmax probability and share of inputs under 0.8 confidence."""
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": np.ascontiguousarray(features, dtype=np.float32)})
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    top = (exp / exp.sum(axis=1, keepdims=True)).max(axis=1)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == labels))
    return accuracy, float(top.mean()), float(np.mean(top < 0.8))


def test_noise_is_bounded_deterministic_and_grows_with_sigma(digits: DigitsSplit) -> None:
    X = digits.X_test
    np.testing.assert_array_equal(add_noise(X, 0.0, np.random.default_rng(1)), X)
    first = add_noise(X, 2.0, np.random.default_rng(7))
    np.testing.assert_array_equal(first, add_noise(X, 2.0, np.random.default_rng(7)))
    assert not np.array_equal(first, add_noise(X, 2.0, np.random.default_rng(8)))
    assert first.dtype == np.float32
    assert first.shape == X.shape
    assert first.min() >= 0.0
    assert first.max() <= 16.0
    deviations = [np.abs(add_noise(X, s, np.random.default_rng(0)) - X).mean() for s in (0.5, 2.0, 6.0)]
    assert deviations[0] < deviations[1] < deviations[2]
    # Blank background gets lit up (negative noise is clipped away), so mean brightness rises.
    assert add_noise(X, 4.0, np.random.default_rng(0)).mean() > X.mean() + 0.5
    with pytest.raises(ValueError):
        add_noise(X, -1.0, np.random.default_rng(0))


@pytest.mark.parametrize("backend", ["scipy", "numpy"])
def test_rotate_known_angles(digits: DigitsSplit, backend: RotateBackend) -> None:
    X = digits.X_test[:50]
    images = X.reshape(-1, 8, 8)
    np.testing.assert_allclose(rotate(X, 0.0, backend=backend), X, atol=1e-6)
    quarter = rotate(X, 90.0, backend=backend).reshape(-1, 8, 8)
    np.testing.assert_allclose(quarter, np.rot90(images, 1, axes=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(rotate(X, 360.0, backend=backend), X, atol=1e-4)


@pytest.mark.parametrize("degrees", [-37.0, 7.5, 25.0, 133.0])
def test_numpy_rotation_matches_scipy(digits: DigitsSplit, degrees: float) -> None:
    np.testing.assert_allclose(
        rotate(digits.X_test, degrees, backend="numpy"),
        rotate(digits.X_test, degrees, backend="scipy"),
        atol=1e-4,
    )


def test_rotation_moves_further_with_angle(digits: DigitsSplit) -> None:
    X = digits.X_test
    shifts = [np.abs(rotate(X, degrees) - X).mean() for degrees in (5.0, 15.0, 30.0)]
    assert 0.0 < shifts[0] < shifts[1] < shifts[2]
    rotated = rotate(X, 30.0)
    assert rotated.min() >= 0.0
    assert rotated.max() <= 16.0
    assert rotated.dtype == np.float32


def test_edge_model_degrades_under_drift(demo_models: dict[str, DemoModel], digits: DigitsSplit) -> None:
    edge, y = demo_models["edge"], digits.y_test
    clean = _edge_confidence(edge, digits.X_test, y)
    rotated_10 = _edge_confidence(edge, rotate(digits.X_test, 10.0), y)
    rotated_25 = _edge_confidence(edge, rotate(digits.X_test, 25.0), y)
    noisy = _edge_confidence(edge, add_noise(digits.X_test, 4.0, np.random.default_rng(0)), y)
    # Accuracy falls, and (what the drift detector sees without labels) confidence falls with it.
    assert rotated_10[0] < clean[0] - 0.05
    assert rotated_25[0] < rotated_10[0] - 0.1
    assert noisy[0] < clean[0] - 0.04
    for drifted in (rotated_10, rotated_25, noisy):
        assert drifted[1] < clean[1] - 0.05
        assert drifted[2] > clean[2] + 0.1


def test_class_mix_shift_follows_requested_mix(digits: DigitsSplit) -> None:
    y = digits.y_test
    weights = [0.5, 0.3, 0.2] + [0.0] * 7
    indices = class_mix_shift(y, weights, np.random.default_rng(3), size=1000)
    assert indices.shape == (1000,)
    assert indices.min() >= 0
    assert indices.max() < len(y)
    np.testing.assert_allclose(class_mix(y[indices], 10), weights, atol=1e-3)
    np.testing.assert_array_equal(indices, class_mix_shift(y, weights, np.random.default_rng(3), size=1000))
    assert len(np.unique(indices)) > 100  # drawn from many samples, not a few repeats

    as_mapping = class_mix_shift(y, {9: 1.0, 4: 3.0}, np.random.default_rng(0))
    assert len(as_mapping) == len(y)
    mix = class_mix(y[as_mapping], 10)
    assert mix[4] == pytest.approx(0.75, abs=1 / len(y))
    assert mix[9] == pytest.approx(0.25, abs=1 / len(y))


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.floats(min_value=0.0, max_value=10.0), min_size=10, max_size=10).filter(
        lambda w: sum(w) > 1e-3
    ),
    size=st.integers(min_value=1, max_value=500),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_class_mix_shift_is_exact_to_one_sample(weights: list[float], size: int, seed: int) -> None:
    y = np.repeat(np.arange(10, dtype=np.int64), 5)
    indices = class_mix_shift(y, weights, np.random.default_rng(seed), size=size)
    assert len(indices) == size
    target = np.asarray(weights) / sum(weights)
    assert np.abs(class_mix(y[indices], 10) - target).max() <= 1.0 / size + 1e-9


def test_class_mix_shift_rejects_impossible_requests() -> None:
    y = np.array([0, 0, 1, 1], dtype=np.int64)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="no samples"):
        class_mix_shift(y, [0.0, 0.5, 0.5], rng)
    with pytest.raises(ValueError):
        class_mix_shift(y, [0.0, 0.0], rng)
    with pytest.raises(ValueError):
        class_mix_shift(y, [1.0, -0.5], rng)


def test_drift_spec_apply(digits: DigitsSplit) -> None:
    X, y = digits.X_test, digits.y_test
    same_X, same_y = DriftSpec("none").apply(X, y, np.random.default_rng(0))
    np.testing.assert_array_equal(same_X, X)
    np.testing.assert_array_equal(same_y, y)

    noisy, noisy_y = DriftSpec("noise", 3.0).apply(X, y, np.random.default_rng(5))
    np.testing.assert_array_equal(noisy, add_noise(X, 3.0, np.random.default_rng(5)))
    np.testing.assert_array_equal(noisy_y, y)

    turned, _ = DriftSpec("rotation", 20.0).apply(X, y, np.random.default_rng(0))
    np.testing.assert_array_equal(turned, rotate(X, 20.0))

    shifted_X, shifted_y = DriftSpec("class_shift", 0.5).apply(X, y, np.random.default_rng(0))
    original = class_mix(y, 10)
    expected = 0.5 * original + 0.5 * np.eye(10)[0]
    np.testing.assert_allclose(class_mix(shifted_y, 10), expected, atol=2 / len(y))
    # Resampled images keep their true labels.
    for image, label in zip(shifted_X[:20], shifted_y[:20], strict=True):
        matches = np.flatnonzero((image == X).all(axis=1))
        assert label in y[matches]

    targeted = DriftSpec("class_shift", 1.0, target_weights=(0.0, 0.0, 1.0, 1.0))
    _, only_two_three = targeted.apply(X, y, np.random.default_rng(0))
    assert set(np.unique(only_two_three)) == {2, 3}


def test_drift_spec_parse_and_validation() -> None:
    assert DriftSpec.parse("rotation:25") == DriftSpec("rotation", 25.0)
    assert DriftSpec.parse("noise:3") == DriftSpec("noise", 3.0)
    assert DriftSpec.parse("none") == DriftSpec("none", 0.0)
    with pytest.raises(ValueError):
        DriftSpec.parse("blur:2")
    with pytest.raises(ValueError):
        DriftSpec("noise", -1.0)
    with pytest.raises(ValueError):
        DriftSpec("class_shift", 1.5)
    with pytest.raises(ValueError):
        DriftSpec("noise", float("nan"))
