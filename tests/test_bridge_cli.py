"""The `cloud-bridge` command: `run --config FILE` as a real subprocess (SIGTERM drains and exits 0,
nothing is lost), help texts, and how every command reports errors and a reader that went away."""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import aiomqtt
import msgspec
import pytest

import cloud_bridge.cli.keys
from cloud_bridge.app import running_bridge
from cloud_bridge.cli import build_parser, main
from cloud_bridge.config import load_config
from cloud_bridge.errors import RegistryError
from cloud_bridge.registry import Registry, SeenMessage
from demokit.models import DemoModel
from devservers import Mosquitto
from schemas import Telemetry, encode, new_msg_id
from schemas.topics import Channel, Topics
from tests.config_files import write_bridge_config, write_toml
from tests.factories import examples
from tests.poll import wait_for_async
from tests.processes import CLOUD_BRIDGE, run_cloud_bridge, running, wait_logged

pytestmark = pytest.mark.timeout(90)


def write_config(tmp_path: Path, broker: Mosquitto, model: Path) -> Path:
    return write_bridge_config(
        tmp_path,
        broker,
        status_interval_s=0.5,
        mqtt={"client_id": "bridge-cli"},
        fleet={"share_group": "bridges"},
        escalation={"model": model},
    )


def stored(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db, timeout=5) as conn:
        try:
            (count,) = conn.execute("SELECT count(*) FROM seen_messages").fetchone()
        except sqlite3.OperationalError:
            return 0  # tables not created yet
    return int(count)


def test_help_lists_run() -> None:
    out = subprocess.run([*CLOUD_BRIDGE, "run", "--help"], capture_output=True, text=True, timeout=30, check=True)
    assert "--config" in out.stdout


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "bad.toml", {"mqtt": {"port": 70000}})
    out = subprocess.run([*CLOUD_BRIDGE, "run", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "[mqtt] port" in out.stderr


def parsers(
    parser: argparse.ArgumentParser, name: str = "cloud-bridge"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the command tree, with its command line."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


def test_every_help_text_reads_clean() -> None:
    module_docs = {m.__doc__.strip() for n, m in sys.modules.items() if n.startswith("cloud_bridge") and m.__doc__}
    helps = {}
    for name, parser in parsers(build_parser()):
        text = helps[name] = parser.format_help()
        # argparse %-formats help strings but prints descriptions as written: `%%` shows up verbatim.
        assert "%%" not in text, name
        assert not re.search(r"[\w/]+\.py\b", text), f"{name} --help points at a source file:\n{text}"
        assert (parser.description or "").strip() not in module_docs, f"{name} shows a module docstring"
    assert len(helps) == 32 and {"cloud-bridge check", "cloud-bridge devices", "cloud-bridge alerts"} <= set(helps)
    assert "5%, 25%, 100%" in " ".join(helps["cloud-bridge rollout"].split())
    top = subprocess.run([*CLOUD_BRIDGE, "--help"], capture_output=True, text=True, timeout=30, check=True)
    assert top.stdout == helps["cloud-bridge"]
    # The installed `cloud-bridge` script runs the same main.
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "cloud-bridge"]
    assert script.load() is main


def test_a_bridge_error_is_one_line_on_stderr_with_its_exit_code(tmp_path: Path) -> None:
    generate = [*CLOUD_BRIDGE, "keys", "generate", "--out", str(tmp_path / "keys")]
    subprocess.run(generate, capture_output=True, timeout=30, check=True)
    again = subprocess.run(generate, capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and again.stdout == ""
    assert re.fullmatch(r"cloud-bridge keys generate: \S+command-signing\.pem already exists: [^\n]+\n", again.stderr)
    config = write_bridge_config(tmp_path)
    usage = subprocess.run(
        [*CLOUD_BRIDGE, "cmd", "ping", "--device", "pi-1", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (usage.returncode, usage.stderr) == (2, "cloud-bridge cmd ping: --device 'pi-1' must be FLEET/DEVICE\n")


def test_main_reports_every_bridge_error_and_hides_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(out: Path) -> None:
        raise RegistryError("the registry is in a state only an operator can sort out")

    monkeypatch.setattr(cloud_bridge.cli.keys, "generate", fail)
    assert main(["keys", "generate", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        "cloud-bridge keys generate: the registry is in a state only an operator can sort out\n"
    )

    def broken_pipe(out: Path) -> None:
        raise BrokenPipeError(32, "Broken pipe")  # not from stdout, which is still there

    monkeypatch.setattr(cloud_bridge.cli.keys, "generate", broken_pipe)
    with pytest.raises(BrokenPipeError):
        main(["keys", "generate", "--out", str(tmp_path)])


@pytest.mark.parametrize("command", [["models", "list"], ["rollout", "status"]])
def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path, command: list[str]) -> None:
    config = write_bridge_config(tmp_path)
    asyncio.run(_create_registry(load_config(config).registry_url))  # reading commands need one
    argv = [*CLOUD_BRIDGE, *command, "--config", str(config)]
    with running("cloud-bridge", argv, tmp_path / "stderr.log", stdout_pipe=True) as proc:
        assert proc.popen is not None and proc.popen.stdout is not None
        # Like `cloud-bridge models list | head -0`: the reader is gone before the first line is written.
        proc.popen.stdout.close()
        assert (proc.wait(30), proc.log_text()) == (0, "")


async def _create_registry(url: str) -> None:
    registry = Registry(url)
    await registry.create()
    await registry.close()


async def test_sigterm_drains_and_exits_0_without_losing_messages(
    tmp_path: Path, mosquitto: Mosquitto, demo_models: dict[str, DemoModel]
) -> None:
    config_path = write_config(tmp_path, mosquitto, demo_models["cloud"].path)
    db = tmp_path / "state" / "registry.db"
    log_path = tmp_path / "bridge.log"
    total = 3000
    template = next(m for m in examples("f1", "d0") if isinstance(m, Telemetry))
    telemetry = [msgspec.structs.replace(template, msg_id=new_msg_id(), device_id=f"d{i % 50}") for i in range(total)]
    with run_cloud_bridge(config_path, log_path) as proc:
        await asyncio.to_thread(wait_logged, proc, "mqtt connected", 20)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
            client.pending_calls_threshold = 1000
            topics = Topics()
            await asyncio.gather(
                *(
                    client.publish(topics.device("f1", m.device_id, Channel.TELEMETRY), encode(m), qos=1)
                    for m in telemetry
                )
            )
        # Stop while the bridge is busy: some stored, more in flight.
        await wait_for_async(lambda: stored(db), 40, "the first messages stored", interval=0.01)
        proc.send_signal(signal.SIGTERM)
        at_sigterm = stored(db)
        rc = await asyncio.to_thread(proc.wait, 30)
        output = proc.log_text()
    assert rc == 0, output
    first_run = stored(db)
    assert "bridge draining" in output and "bridge stopped" in output
    # What the first run did not ack, the broker redelivers to the same session: all arrive exactly once.
    async with running_bridge(load_config(config_path)) as bridge:
        assert bridge.ingestor is not None
        async with asyncio.timeout(30):
            await bridge.ingestor.wait_for(lambda s: s.stored + s.duplicates >= total - first_run)
        assert await bridge.registry.count(SeenMessage) == total
        # The drain stored and acked everything it had received: nothing comes back twice.
        assert bridge.ingestor.stats.duplicates == 0
    assert stored(db) == total
    print(f"stored at SIGTERM: {at_sigterm} of {total}")
