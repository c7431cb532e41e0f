"""Bridge config: TOML, CLOUD_BRIDGE_* overrides, and errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_bridge.config import load_config
from cloud_bridge.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cloud.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file(tmp_path: Path) -> None:
    config = load_config(None, env={"CLOUD_BRIDGE__STATE_DIR": str(tmp_path)})
    assert config.mqtt.protocol == "mqtt5"
    assert config.fleet.prefix == "fleet" and config.fleet.share_group == "bridges" and config.fleet.shared
    assert config.registry_url == f"sqlite+aiosqlite:///{tmp_path.resolve() / 'registry.db'}"
    assert config.influx.url is None
    assert config.escalation.model is None


def test_toml_then_env_overrides(tmp_path: Path) -> None:
    model = tmp_path / "cloud.onnx"
    model.write_bytes(b"x")
    path = write(
        tmp_path,
        f"""
[mqtt]
host = "broker.example"
port = 8883
keepalive = 15
[fleet]
prefix = "acme/fleet"
shared = false
[escalation]
model_path = "{model}"
providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
max_batch = 8
[influx]
url = "http://tsdb:8086"
bucket = "b1"
""",
    )
    env = {
        "CLOUD_BRIDGE__MQTT__HOST": "other-broker",
        "CLOUD_BRIDGE__MQTT__PORT": "1884",
        "CLOUD_BRIDGE__FLEET__SHARED": "true",
        "CLOUD_BRIDGE__ESCALATION__PROVIDERS": "CPUExecutionProvider",
        "CLOUD_BRIDGE__INGEST__DEAD_LETTER_MAX_BYTES": "512",
        "UNRELATED": "ignored",
    }
    config = load_config(path, env=env)
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.keepalive) == ("other-broker", 1884, 15)
    assert config.fleet.prefix == "acme/fleet" and config.fleet.shared is True
    assert config.escalation.model == model
    assert config.escalation.providers == ("CPUExecutionProvider",)
    assert config.escalation.max_batch == 8
    assert config.influx.url == "http://tsdb:8086" and config.influx.bucket == "b1"
    assert config.ingest.dead_letter_max_bytes == 512


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ("[mqtt]\nport = 0\n", {}, "[mqtt] port = 0 must be between 1 and 65535"),
        ("[mqtt]\nport = 'x'\n", {}, "[mqtt] port must be an integer"),
        ("", {"CLOUD_BRIDGE__MQTT__KEEPALIVE": "soon"}, "[mqtt] keepalive = 'soon' (from the environment)"),
        ("[mqtt]\nprotocol = 'mqtt4'\n", {}, "[mqtt] protocol = 'mqtt4' is not allowed: use one of"),
        ("[mqtt]\nhots = 'a'\n", {}, "unknown key(s) [mqtt] hots: known keys are client_id"),
        ("[fleet]\nshare_group = 'a/b'\n", {}, "[fleet]"),
        ("[fleet]\nshared = 'maybe'\n", {}, "[fleet] shared = 'maybe' must be true or false"),
        ("[escalation]\nmodel = '/nonexistent.onnx'\n", {}, "[escalation] model = '/nonexistent.onnx' does not exist"),
        ("[escalation]\nmax_concurrency = 0\n", {}, "[escalation] max_concurrency = 0 must be greater than 0"),
        ("[registry]\nurl = 'mysql://x'\n", {}, "[registry] url = 'mysql://x'"),
        ("[influx]\nurl = 'tsdb:8086'\n", {}, "[influx] url = 'tsdb:8086' must start with http://"),
        ("[mqtt\n", {}, "is not valid TOML"),
        ("colour = 1\n", {}, "unknown key(s) or section(s) colour: known are [drift]"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env)
    assert needle in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})


def test_the_example_config_documents_the_defaults() -> None:
    """examples/cloud.toml lists every section with its defaults: it must load to exactly the defaults,
    so the documentation cannot drift from the code."""
    from cloud_bridge.config import BridgeConfig

    example = Path(__file__).resolve().parents[1] / "examples" / "cloud.toml"
    # A relative path in a file is relative to the file.
    assert load_config(example, env={}) == BridgeConfig(state_dir=example.parent / "bridge-state")


def test_the_older_variable_form_still_works_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = {"CLOUD_BRIDGE_MQTT__PORT": "1884", "CLOUD_BRIDGE_STATE_DIR": str(tmp_path)}
    with caplog.at_level("WARNING"):
        config = load_config(None, env=env)
    assert config.mqtt.port == 1884 and config.state_dir == tmp_path
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "CLOUD_BRIDGE_MQTT__PORT: this form is deprecated, use CLOUD_BRIDGE__SECTION__KEY" in warned
    with pytest.raises(ConfigError, match="CLOUD_BRIDGE_MQTT_PORT: use CLOUD_BRIDGE__SECTION__KEY"):
        load_config(None, env={"CLOUD_BRIDGE_MQTT_PORT": "1884"})


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "ca.crt").write_text("x")
    path = tmp_path / "conf" / "cloud.toml"
    path.write_text('state_dir = "state"\n[mqtt]\ntls_ca = "ca.crt"\n')
    config = load_config(path, env={})
    assert config.state_dir == tmp_path / "conf" / "state" and config.mqtt.tls_ca == tmp_path / "conf" / "ca.crt"
