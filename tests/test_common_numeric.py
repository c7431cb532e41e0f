"""common/numeric.py: the one softmax, in the precision each caller asks for."""

from __future__ import annotations

import numpy as np

from common.numeric import softmax


def test_softmax_rows_are_distributions_in_the_requested_precision() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((16, 10)) * 5).astype(np.float32)
    probs = softmax(logits)
    assert probs.dtype == np.float32 and probs.shape == (16, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    wide = softmax(logits, np.float64)
    assert wide.dtype == np.float64
    # The textbook definition, row by row, in float64.
    expected = np.exp(logits.astype(np.float64))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(wide, expected, rtol=1e-12)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert (probs.argmax(axis=1) == logits.argmax(axis=1)).all()


def test_softmax_of_huge_logits_does_not_overflow() -> None:
    logits = np.array([[1e4, 0.0, -1e4], [3.0, 3.0, 3.0]], np.float32)
    probs = softmax(logits)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs, [[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], atol=1e-6)
    assert softmax([[0.5]], np.float64).tolist() == [[1.0]]  # one class, from a plain list
