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
        ("[improve]\nstages = '25,100,shadow:5'\n", {}, "[improve] stages = '25,100,shadow:5': a shadow stage comes"),
        ("[improve]\nstages = 'shadow:100'\n", {}, "[improve] stages = 'shadow:100': a shadow stage precedes"),
        ("[improve]\nholdout = 1.0\n", {}, "[improve] holdout = 1.0 must be between 0 and 1"),
        ("[improve]\nmin_human = 0\n", {}, "[improve] min_human = 0 must be at least 1"),
        ("[improve]\nteacher = 'digits-cloud'\n", {}, "[improve] teacher = 'digits-cloud' must be NAME@VERSION"),
        ("[improve]\nfleets = ['a/b']\n", {}, "[improve] fleets 'a/b' contains '/'"),
        ("[improve]\ntick_s = 400.0\n", {}, "[improve] lease_s = 600.0 must exceed 2 x tick_s (400.0)"),
        ("[improve]\nhidden = [0]\n", {}, "[improve] hidden = [0] must list layer sizes"),
        ("", {"CLOUD_BRIDGE__IMPROVE__AUTO": "maybe"}, "[improve] auto = 'maybe' (from the environment) must be true"),
        ("", {"CLOUD_BRIDGE__IMPROVE__MIN_GAIN": "lots"}, "[improve] min_gain = 'lots' (from the environment)"),
        ("[improve]\nautomatic = true\n", {}, "unknown key(s) [improve] automatic: known keys are auto"),
        ("[improve]\nthresholds = ['max_agreement_drop']\n", {}, "[improve] thresholds = ['max_agreement_drop']: "),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env)
    assert needle in str(info.value)


def test_the_improve_section_from_the_file_and_the_environment(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[improve]\nauto = true\nfleets = ['f1']\nstages = 'shadow:50,25,100'\nhidden = [64]\n"
        "thresholds = ['max_agreement_drop=0.5', 'shadow:min_shadow_inputs=50']\n",
    )
    env = {"CLOUD_BRIDGE__IMPROVE__IN_BRIDGE": "true", "CLOUD_BRIDGE__IMPROVE__MIN_HUMAN": "120"}
    improve = load_config(path, env=env).improve
    assert (improve.auto, improve.in_bridge, improve.fleets, improve.min_human) == (True, True, ("f1",), 120)
    options = improve.loop_options()
    # The stages as a loop records them (a shadow stage as minus its share); the built-in trainer unnamed.
    assert options["stages"] == [-50, 25, 100] and options["hidden"] == [64] and "trainer" not in options
    assert options["thresholds"] == {"*": {"max_agreement_drop": 0.5}, "shadow": {"min_shadow_inputs": 50.0}}
    mine = load_config(None, env={"CLOUD_BRIDGE__IMPROVE__TRAINER": "python -m mine.train"}).improve
    assert mine.loop_options()["trainer"] == ["python", "-m", "mine.train"]
    # The loop's own defaults are [improve]'s, with a shadow stage before the canary stages.
    from cloud_bridge.improve.driver import DEFAULT_OPTIONS

    defaults = load_config(None, env={}).improve.loop_options()
    assert {k: DEFAULT_OPTIONS[k] for k in defaults} == defaults and defaults["stages"] == [-100, 25, 100]


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
