"""Pytest fixtures: the real demo ONNX models and the digits split they were trained and scored on."""

from __future__ import annotations

import pytest

from demokit.dataset import DigitsSplit
from demokit.models import DemoModel, build_demo_models, load_split


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DemoModel]:
    """The edge ("edge") and cloud ("cloud") demo models, built once per session into a temp dir."""
    return build_demo_models(tmp_path_factory.mktemp("demo_models"), seed=0)


@pytest.fixture(scope="session")
def digits() -> DigitsSplit:
    """The digits split the demo models use (their held-out set is ``X_test``/``y_test``)."""
    return load_split()
