"""The example configs document every key the code reads, on both sides.

README points newcomers at examples/edge.toml and examples/cloud.toml for "every key": a field
added to a config dataclass without a line in its example (active, or commented out as
`# key = value`) fails here, naming the section and the key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import pytest

from cloud_bridge.config import BridgeConfig
from edge_node.config import EdgeConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
_SECTION = re.compile(r"^\s*#?\s*\[([a-z_.]+)\]\s*(#.*)?$")
_KEY = re.compile(r'^\s*#?\s*("?[A-Za-z0-9_.-]+"?)\s*=')


def documented_keys(path: Path) -> dict[str, set[str]]:
    """section -> keys written in it, commented out or not ("" is the top level)."""
    keys: dict[str, set[str]] = {"": set()}
    section = ""
    for line in path.read_text().splitlines():
        if match := _SECTION.match(line):
            section = match.group(1)
            keys.setdefault(section, set())
        elif match := _KEY.match(line):
            keys[section].add(match.group(1).strip('"'))
    return keys


def config_keys(root: type[typing.Any]) -> dict[str, set[str]]:
    """section -> field names of a config dataclass whose fields are sections (and top-level scalars)."""
    hints = typing.get_type_hints(root)
    out: dict[str, set[str]] = {"": set()}
    for field in dataclasses.fields(root):
        hint = hints[field.name]
        # A tagged union ([source]) documents the keys of every kind.
        members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if all(dataclasses.is_dataclass(m) for m in members):
            out[field.name] = {f.name for m in members for f in dataclasses.fields(m)}
        else:
            out[""].add(field.name)
    return out


@pytest.mark.parametrize(("example", "root"), [("edge.toml", EdgeConfig), ("cloud.toml", BridgeConfig)])
def test_every_config_key_is_in_its_example(example: str, root: type[typing.Any]) -> None:
    documented = documented_keys(EXAMPLES / example)
    missing = [
        f"[{section}] {key}" if section else key
        for section, names in config_keys(root).items()
        for key in sorted(names)
        if key not in documented.get(section, set()) and f"{section}.{key}" not in documented
    ]
    assert not missing, f"examples/{example} does not document: {', '.join(missing)}"


def test_the_checker_sees_a_missing_key(tmp_path: Path) -> None:
    text = (EXAMPLES / "edge.toml").read_text()
    trimmed = tmp_path / "edge.toml"
    trimmed.write_text(re.sub(r"(?m)^\s*#?\s*inflight_window\s*=.*$", "", text))
    assert "inflight_window" in documented_keys(EXAMPLES / "edge.toml")["mqtt"]
    assert "inflight_window" not in documented_keys(trimmed)["mqtt"]


def test_what_keys_generate_prints_pastes_into_the_examples(tmp_path: Path, demo_models: dict[str, typing.Any]) -> None:
    """README's OTA steps: the lines `cloud-bridge keys generate` prints go into the example files as
    they are (under [ota.trusted_keys] and [ota]) and load."""
    from cloud_bridge.config import load_config as load_bridge
    from cloud_bridge.ota.keys import generate
    from edge_node.config import load_config as load_edge

    made = generate(tmp_path / "keys")
    edge = tmp_path / "edge.toml"
    text = (
        (EXAMPLES / "edge.toml")
        .read_text()
        .replace('path = "../build/models/digits-edge-1.0.0.onnx"', f'path = "{demo_models["edge"].path}"')
    )
    assert text.rstrip().splitlines()[-1].startswith("#"), "examples/edge.toml must end with [ota.trusted_keys]"
    edge.write_text(text + made.device_toml())
    assert load_edge(edge, environ={}).ota.trusted_keys == {made.key_id: made.public_b64}

    cloud = tmp_path / "cloud.toml"
    cloud.write_text((EXAMPLES / "cloud.toml").read_text().replace("[ota]\n", "[ota]\n" + made.bridge_toml()))
    assert load_bridge(cloud, env={}).ota.signing_key == made.private_path
