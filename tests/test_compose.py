"""compose.yaml checked without a Docker engine: it parses, what it mounts exists, no secret is inline,
and every service's environment and TOML config load with the programs' real config loaders.

Container paths are mapped back to host paths through each service's own mounts (and the Dockerfile's
COPY into /etc/edgefleet), so a config naming a path no mount provides fails here.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloud_bridge.config import load_config as load_bridge_config
from demokit.models import cloud_config, edge_config
from edge_node.config import load_config as load_edge_config
from tests.broker_stack import MOSQUITTO_DIR
from tests.pki import REPO, Pki, env_name

COMPOSE = REPO / "compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "docker" / "Dockerfile"
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
_SECRET_RE = re.compile(r"PASSWORD|TOKEN|SECRET", re.I)
_INFLUX_INIT = {
    "DOCKER_INFLUXDB_INIT_MODE",
    "DOCKER_INFLUXDB_INIT_USERNAME",
    "DOCKER_INFLUXDB_INIT_PASSWORD",
    "DOCKER_INFLUXDB_INIT_ORG",
    "DOCKER_INFLUXDB_INIT_BUCKET",
    "DOCKER_INFLUXDB_INIT_RETENTION",
    "DOCKER_INFLUXDB_INIT_ADMIN_TOKEN",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items()}


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    pairs = (ln.split("=", 1) for ln in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines() if "=" in ln)
    return {k.strip(): v.strip() for k, v in pairs if not k.lstrip().startswith("#")}


def _interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ (a literal $)."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        got = env.get(name, "")
        if op in (":-", "-") and not got:
            return arg or ""
        if op in (":?", "?") and not got:
            raise AssertionError(f"compose would stop: {name} is unset ({arg})")
        return got

    return _VAR_RE.sub(one, value).replace("$$", "$")


def _strings(node: object) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _volumes(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume; a source starting with . or / is a bind mount."""
    out = []
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        out.append((source, target))
    return out


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def _image_files() -> dict[str, Path]:
    """Files the Dockerfile copies to /etc/edgefleet/ (container path -> repo path)."""
    out = {}
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and parts[-1] == "/etc/edgefleet/":
            out.update({f"/etc/edgefleet/{Path(src).name}": REPO / src for src in parts[1:-1]})
    return out


def test_compose_declares_the_stack(services: dict[str, dict[str, Any]]) -> None:
    assert {"mosquitto", "influxdb", "grafana", "cloud-bridge", "models"} <= set(services)
    edges = [n for n, s in services.items() if _command(s)[:1] == ["edge-node"]]
    assert 2 <= len(edges) <= 3


def test_long_running_services_have_health_checks_and_restart_policies(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, svc in services.items():
        if svc.get("restart") == "no":
            continue  # one-shot init services
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), name
        test = svc.get("healthcheck", {}).get("test")
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name


def test_dependencies_exist_and_wait_for_health(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            one_shot = services[dep].get("restart") == "no"
            expected = "service_completed_successfully" if one_shot else "service_healthy"
            assert cond == {"condition": expected}, (name, dep)


def test_named_volumes_are_declared_and_used(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared = set(compose["volumes"])
    used = {src for svc in services.values() for src, _ in _volumes(svc) if not src.startswith((".", "/"))}
    assert used == declared


def test_bind_mounts_and_build_files_exist(services: dict[str, dict[str, Any]], pki: Pki) -> None:
    for name, svc in services.items():
        for source, _ in _volumes(svc):
            if not source.startswith("."):
                continue
            rel = Path(source)
            if rel.parts[:2] == ("build", "pki"):
                # Generated by scripts/gen-certs.sh (never committed): the generator must produce it.
                generated = pki.dir.joinpath(*rel.parts[2:])
                assert generated.exists(), f"{name}: {source} is not produced by scripts/gen-certs.sh"
            else:
                assert (REPO / rel).exists(), f"{name}: bind mount source {source} does not exist"
        build = svc.get("build")
        if build is not None:
            assert (REPO / build["context"] / build["dockerfile"]).is_file(), name
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"]:
            for src in parts[1:-1]:
                assert (REPO / src).exists(), f"Dockerfile copies missing {src}"


def test_no_secret_is_inline_and_every_variable_is_in_env_example(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], env_example: dict[str, str]
) -> None:
    for name, svc in services.items():
        for key, value in svc.get("environment", {}).items():
            if _SECRET_RE.search(key):
                match = _VAR_RE.fullmatch(str(value))
                assert match is not None and match.group(2) in (None, ":?"), (
                    f"{name}: {key} must come from .env as ${{VAR}} or ${{VAR:?message}}, with no default"
                )
    used = {m.group(1) for text in _strings(compose) for m in _VAR_RE.finditer(text)}
    assert used <= set(env_example), f"missing from .env.example: {sorted(used - set(env_example))}"
    assert set(env_example) <= used, f".env.example has unused keys: {sorted(set(env_example) - used)}"


def test_influxdb_and_grafana_environment(services: dict[str, dict[str, Any]]) -> None:
    assert set(services["influxdb"]["environment"]) == _INFLUX_INIT
    provisioning = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "grafana" / "provisioning").rglob("*.yaml"))
    referenced = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", provisioning))
    grafana_env = set(services["grafana"]["environment"])
    # Every non-GF_ variable exists for the provisioning files, and everything they read is set.
    assert {k for k in grafana_env if not k.startswith("GF_")} == referenced


def test_grafana_reads_influxql_through_the_dbrp_mapping_compose_creates(services: dict[str, dict[str, Any]]) -> None:
    """InfluxDB 2 answers InfluxQL only for a database mapped to a bucket: the init script maps the
    database the datasource queries to the bucket the bridge writes."""
    influx, grafana = services["influxdb"], services["grafana"]
    init_dir = dict((t, s) for s, t in _volumes(influx))["/docker-entrypoint-initdb.d"]
    scripts = sorted((REPO / init_dir).glob("*.sh"))
    assert scripts and all(p.stat().st_mode & 0o111 for p in scripts), "the image runs only executable *.sh"
    (script,) = scripts
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text(encoding="utf-8")
    assert "influx v1 dbrp create" in text and "--rp autogen" in text and "--default" in text
    assert '--db "${DOCKER_INFLUXDB_INIT_BUCKET}"' in text and '--bucket-id "${DOCKER_INFLUXDB_INIT_BUCKET_ID}"' in text
    (source,) = yaml.safe_load((REPO / "grafana" / "provisioning" / "datasources" / "influxdb.yaml").read_text())[
        "datasources"
    ]
    assert source["jsonData"]["version"] == "InfluxQL"
    database = re.fullmatch(r"\$\{([A-Z_]+)\}", source["jsonData"]["dbName"])
    assert database is not None
    # The datasource's database is the bucket InfluxDB set up, which the bridge writes (api v2).
    assert grafana["environment"][database.group(1)] == influx["environment"]["DOCKER_INFLUXDB_INIT_BUCKET"]
    assert (
        services["cloud-bridge"]["environment"]["CLOUD_BRIDGE__INFLUX__BUCKET"]
        == influx["environment"]["DOCKER_INFLUXDB_INIT_BUCKET"]
    )
    assert source["secureJsonData"]["httpHeaderValue1"] == "Token ${INFLUXDB_TOKEN}"
    assert grafana["environment"]["INFLUXDB_TOKEN"] == influx["environment"]["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"]


def _container_paths(service: dict[str, Any], pki: Pki, scratch: Path) -> dict[str, Path]:
    """Container path -> host path for what this service sees: image files and its mounts."""
    paths = dict(_image_files())
    for source, target in _volumes(service):
        if source.startswith("./build/pki/"):
            paths[target] = pki.dir / Path(source).relative_to("./build/pki")
        elif source.startswith("."):
            paths[target] = REPO / source
        else:
            volume = scratch / source
            volume.mkdir(parents=True, exist_ok=True)
            if source == "models":
                # What the `models` init service writes there (python -m demokit.models --out /models).
                for config in (edge_config(), cloud_config()):
                    (volume / config.file_name).write_bytes(b"")
            paths[target] = volume
    return paths


def _to_host(text: str, paths: Mapping[str, Path]) -> str:
    for container in sorted(paths, key=len, reverse=True):
        text = text.replace(container, str(paths[container]))
    return text


def _service_env(service: dict[str, Any], env_example: Mapping[str, str], paths: Mapping[str, Path]) -> dict[str, str]:
    source = {k: v or f"test-{k.lower()}" for k, v in env_example.items()}
    return {k: _to_host(_interpolate(str(v), source), paths) for k, v in service.get("environment", {}).items()}


def _host_config(service: dict[str, Any], paths: Mapping[str, Path], scratch: Path) -> Path:
    command = _command(service)
    container_path = command[command.index("--config") + 1]
    assert container_path in paths, f"--config {container_path} is neither in the image nor mounted"
    rendered = scratch / Path(container_path).name
    rendered.write_text(_to_host(paths[container_path].read_text(encoding="utf-8"), paths), encoding="utf-8")
    return rendered


def _acl_users() -> set[str]:
    return set(re.findall(r"^user (\S+)$", (MOSQUITTO_DIR / "acl").read_text(encoding="utf-8"), re.M))


@pytest.mark.parametrize("kind", ["edge-node", "cloud-bridge"])
def test_python_services_load_with_the_real_config_loaders(
    services: dict[str, dict[str, Any]], env_example: dict[str, str], pki: Pki, tmp_path: Path, kind: str
) -> None:
    chosen = {n: s for n, s in services.items() if _command(s)[:1] == [kind]}
    assert chosen
    for name, svc in chosen.items():
        scratch = tmp_path / name
        paths = _container_paths(svc, pki, scratch)
        env = _service_env(svc, env_example, paths)
        config_file = _host_config(svc, paths, scratch)
        if kind == "edge-node":
            assert all(k.startswith("EDGE_NODE__") for k in env), f"{name}: env the edge node does not read"
            edge = load_edge_config(config_file, environ=env)
            device = edge.device.device_id
            # The ACL binds topics to the username: it must be the device id, with gen-certs' password name.
            assert edge.mqtt.username == device, name
            assert svc["environment"]["EDGE_NODE__MQTT__PASSWORD"].startswith(f"${{{env_name(device)}:")
            assert device in pki.passwords and edge.mqtt.tls_ca is not None and edge.mqtt.port == 8883
        else:
            assert all(k.startswith("CLOUD_BRIDGE__") for k in env), f"{name}: env not in the bridge's form"
            bridge = load_bridge_config(config_file, env=env)
            assert bridge.mqtt.username in _acl_users() and bridge.mqtt.username in pki.passwords
            assert bridge.mqtt.client_id == bridge.mqtt.username, "use_username_as_clientid makes them equal"
            assert bridge.influx.url is not None and bridge.escalation.model is not None


def test_broker_mounts_cover_every_path_of_the_shipped_config(services: dict[str, dict[str, Any]]) -> None:
    broker = services["mosquitto"]
    conf_target = _command(broker)[_command(broker).index("-c") + 1]
    targets = [target for _, target in _volumes(broker)]
    assert conf_target in targets
    conf = (MOSQUITTO_DIR / "cloud.conf").read_text(encoding="utf-8")
    for path in set(re.findall(r"(/mosquitto/\S+)", conf)):
        assert any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets), f"{path} is not mounted"
    # The init service copies exactly the files the config reads from the certs volume.
    copied = set(re.findall(r"/pki/(\S+)", " ".join(_command(services["mosquitto-certs"]))))
    needed = {Path(p).name for p in re.findall(r"/mosquitto/certs/(\S+)", conf)}
    assert needed <= copied, needed - copied


def test_health_check_script_sees_an_established_connection() -> None:
    """docker/healthcheck.py against this machine's real socket table."""
    script = [sys.executable, str(REPO / "docker" / "healthcheck.py")]
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert subprocess.run([*script, str(port)], capture_output=True, timeout=30).returncode == 1
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            accepted, _ = server.accept()
            with accepted:
                assert client.fileno() >= 0
                assert subprocess.run([*script, str(port)], capture_output=True, timeout=30).returncode == 0
    assert subprocess.run([*script, "not-a-port"], capture_output=True, timeout=30).returncode == 2
