"""The layout's rules hold in the code: which package may import which, and modules stay small.

README's "Layout" section: edge_node and cloud_bridge never import each other; common/ and schemas/
are written for both and import neither; a device never needs the demo kit at import time (checked
with the interpreter in test_edge_imports.py). A module that grows past MAX_LINES is doing more than
one thing: split it by concern.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("schemas", "common", "edge_node", "cloud_bridge", "demokit", "fleetsim")
# package -> top-level packages of this repository it must not import
FORBIDDEN = {
    "schemas": {"common", "edge_node", "cloud_bridge", "demokit", "devservers"},
    "common": {"edge_node", "cloud_bridge", "demokit", "devservers"},
    "edge_node": {"cloud_bridge", "devservers"},
    "cloud_bridge": {"edge_node", "devservers"},
    "demokit": {"edge_node", "cloud_bridge", "devservers"},
    # The simulator speaks only the wire contract, as a third party's devices would.
    "fleetsim": {"edge_node", "cloud_bridge", "demokit", "devservers"},
}
MAX_LINES = 450


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported_packages(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_what_the_layout_allows(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(_imported_packages(path) & FORBIDDEN[package])
        for path in _modules(package)
        if _imported_packages(path) & FORBIDDEN[package]
    }
    assert not wrong, f"{package} imports what it must not: {wrong}"


def test_the_import_check_sees_an_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\nfrom cloud_bridge.config import load_config\n\ndef f():\n    import edge_node.app\n")
    assert {"cloud_bridge", "edge_node", "os"} <= _imported_packages(module)


def test_no_product_module_is_over_the_size_of_one_concern() -> None:
    big = {
        str(path.relative_to(ROOT)): n
        for package in PRODUCT
        for path in _modules(package)
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines (split them by concern): {big}"
