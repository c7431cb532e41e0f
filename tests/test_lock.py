"""The lock files agree with pyproject.toml: every requirement is pinned, to a version its range allows.

`make demo`, `make test`, CI and the Docker image install only from the locks; pyproject keeps the
ranges for people who install the packages as libraries. When someone edits a range or adds a
dependency without running `make lock`, this fails and names the package. Label Studio's own lock
(requirements-label-studio.lock, for its venv) must pin what requirements-label-studio.in asks for.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "edgefleet"
# lock file -> the extras it must cover (the main dependencies and the `build` group always)
LOCKS = {"requirements.lock": ("dev",), "docker/requirements.lock": ("demo", "postgres")}
# Label Studio's own venv (.venv-label-studio, for tests/test_label_studio.py): its input and its lock.
LABEL_STUDIO_IN, LABEL_STUDIO_LOCK = "requirements-label-studio.in", "requirements-label-studio.lock"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def _pins(path: Path) -> dict[str, Version]:
    """name -> the version pinned for this interpreter (a universal lock forks by marker)."""
    env = default_environment()
    pins: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        match = _PIN.match(line)
        if match is None:
            continue
        name, version, marker = match.groups()
        if marker and not Requirement(f"x; {marker}").marker.evaluate(env):  # type: ignore[union-attr]
            continue
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements(extras: tuple[str, ...]) -> list[Requirement]:
    """pyproject's requirements for these extras, following the project's references to itself."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    optional: dict[str, list[str]] = project["optional-dependencies"]
    out = [Requirement(spec) for spec in project["dependencies"] + meta["dependency-groups"]["build"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            raise AssertionError(f"pyproject.toml has no extra {extra!r}")
        for spec in optional[extra]:
            req = Requirement(spec)
            if canonicalize_name(req.name) == PROJECT:
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_requirement_is_pinned_within_its_range(lock: str) -> None:
    path = ROOT / lock
    assert path.exists(), f"{lock} is missing: run `make lock`"
    pins = _pins(path)
    env = default_environment()
    problems = []
    for req in _requirements(LOCKS[lock]):
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"{req.name} ({req}) is not in {lock}")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"{req.name}=={pinned} in {lock} is outside pyproject's range {req.specifier}")
    assert not problems, "pyproject.toml and the lock disagree; run `make lock`:\n" + "\n".join(problems)


def test_the_label_studio_lock_pins_what_its_input_asks_for() -> None:
    pins = _pins(ROOT / LABEL_STUDIO_LOCK)
    problems = []
    for line in (ROOT / LABEL_STUDIO_IN).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pinned = pins.get(canonicalize_name(req.name))
            if pinned is None or not req.specifier.contains(pinned, prereleases=True):
                problems.append(f"{LABEL_STUDIO_IN} asks for {req}; {LABEL_STUDIO_LOCK} pins {pinned}")
    assert not problems, "run `make lock-label-studio`:\n" + "\n".join(problems)


def test_every_pin_has_a_hash() -> None:
    for lock in (*LOCKS, LABEL_STUDIO_LOCK):
        text = (ROOT / lock).read_text()
        entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
        unhashed = [e.split("==")[0] for e in entries if "==" in e and "--hash=sha256:" not in e]
        assert not unhashed, f"{lock}: pins without hashes: {unhashed}"


def test_the_image_lock_pins_what_the_development_lock_pins() -> None:
    dev, image = _pins(ROOT / "requirements.lock"), _pins(ROOT / "docker/requirements.lock")
    differ = {name: (str(version), str(dev.get(name))) for name, version in image.items() if dev.get(name) != version}
    assert not differ, (
        f"docker/requirements.lock differs from requirements.lock (image, dev): {differ}; run `make lock`"
    )


def test_pin_parser_reads_markers() -> None:
    # A universal lock pins numpy twice, by Python version: exactly one applies here.
    pins = _pins(ROOT / "requirements.lock")
    assert "numpy" in pins and "colorama" not in pins  # colorama only on Windows
