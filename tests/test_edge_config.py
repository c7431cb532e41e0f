"""Edge node config: TOML, EDGE_NODE__SECTION__KEY overrides typed by the field they set, and
errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_node.config import load_config
from edge_node.errors import ConfigError

TOML = """
[device]
fleet_id = "f1"
device_id = "pi-0001"
[model]
path = "models/edge.onnx"
[mqtt]
host = "gateway.local"
port = 1883
"""


def _write(tmp_path: Path, text: str = TOML) -> Path:
    """The config file, and the model file it names (validation checks that it exists)."""
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "models" / "edge.onnx").write_bytes(b"not loaded by load_config")
    path = tmp_path / "edge.toml"
    path.write_text(text)
    return path


def test_env_overrides_are_typed_by_the_field_they_set(tmp_path: Path) -> None:
    env = {
        "EDGE_NODE__MQTT__PASSWORD": "12345",  # digits, yet a password: stays a string
        "EDGE_NODE__MQTT__USERNAME": "true",
        "EDGE_NODE__DEVICE__DEVICE_ID": "0042",
        "EDGE_NODE__MQTT__PORT": "8883",
        "EDGE_NODE__ROUTING__CONFIDENCE_THRESHOLD": "0.9",
        "EDGE_NODE__ROUTING__ESCALATE": "false",
        "EDGE_NODE__MODEL__PROVIDERS": '["CUDAExecutionProvider", "CPUExecutionProvider"]',
        "EDGE_NODE__MQTT__HOST": "cloud.example",
        "UNRELATED": "x",
    }
    config = load_config(_write(tmp_path), environ=env)
    assert (config.mqtt.password, config.mqtt.username, config.device.device_id) == ("12345", "true", "0042")
    assert (config.mqtt.host, config.mqtt.port) == ("cloud.example", 8883)
    assert config.routing.confidence_threshold == 0.9 and config.routing.escalate is False
    assert config.model.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert config.model.path == tmp_path / "models" / "edge.onnx"  # relative to the file


def test_one_provider_from_the_environment_needs_no_list(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path), environ={"EDGE_NODE__MODEL__PROVIDERS": "CPUExecutionProvider"})
    assert config.model.providers == ("CPUExecutionProvider",)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"EDGE_NODE__MQTT__PORT": "eighty"}, "[mqtt] port = 'eighty' (from the environment) must be an integer"),
        ({"EDGE_NODE__MQTT__PORT": "1.5"}, "[mqtt] port must be an integer"),
        ({"EDGE_NODE__ROUTING__ESCALATE": "maybe"}, "[routing] escalate = 'maybe' (from the environment) must be"),
        ({"EDGE_NODE_MQTT__HOST": "x"}, "EDGE_NODE_MQTT__HOST: use EDGE_NODE__SECTION__KEY"),
        ({"EDGE_NODE__MQTT": "x"}, "EDGE_NODE__MQTT: use EDGE_NODE__SECTION__KEY"),
        ({"EDGE_NODE__MQTT__HOTS": "x"}, "unknown key(s) [mqtt] hots"),
    ],
)
def test_bad_overrides_name_the_variable_or_key(tmp_path: Path, env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path), environ=env)
    assert needle in str(info.value)


def test_yes_and_no_from_the_environment_are_booleans(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path), environ={"EDGE_NODE__ROUTING__ESCALATE": "No"})
    assert config.routing.escalate is False


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ('kind = "camera"', "[source] kind = 'camera' is not allowed: use one of 'mqtt', 'directory', 'replay'"),
        ('kind = "mqtt"\nrate_hz = 5', '[source] rate_hz of kind = "mqtt": known keys are kind'),
        ('kind = "directory"', '[source] kind = "directory" needs path = "DIR"'),
        ('kind = "replay"\ndrift = "class_shift"\ndrift_strength = 3.0', "[source] drift_strength of class_shift"),
    ],
)
def test_source_kinds_take_only_their_own_keys(tmp_path: Path, source: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, TOML + "[source]\n" + source + "\n"), environ={})
    assert needle in str(info.value)


def test_a_source_kind_builds_its_own_config(tmp_path: Path) -> None:
    from edge_node.config import DirectorySourceConfig, MqttSourceConfig, ReplaySourceConfig

    assert load_config(_write(tmp_path), environ={}).source == MqttSourceConfig()
    replay = load_config(_write(tmp_path, TOML + '[source]\nkind = "replay"\nrate_hz = 5\n'), environ={})
    assert replay.source == ReplaySourceConfig(rate_hz=5.0)
    inbox = load_config(_write(tmp_path, TOML + '[source]\nkind = "directory"\npath = "inbox"\n'), environ={})
    assert inbox.source == DirectorySourceConfig(path=tmp_path / "inbox")
