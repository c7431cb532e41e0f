"""OTA delivery end to end: signed commands, the model store, chunked resumable download.

Real Mosquitto, the real bridge (`running_bridge`: ModelStore, CommandSender, ChunkServer), real edge
nodes in-process (tests/edge_harness.py), a real TCP proxy for the cut. The artifact is the demo cloud
model (~200 KB) in 4 KB chunks, so a download has ~50 chunks. The installer is a stand-in that records
the verified file and acks "done": the real one (edge_node/ota/installer.py) is tested by its own suite.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from cloud_bridge.app import Bridge, running_bridge
from cloud_bridge.config import BridgeConfig, FleetConfig, MqttConfig, OtaConfig
from cloud_bridge.errors import ModelStoreError
from cloud_bridge.models.store import ModelRecord, ModelStore
from cloud_bridge.ota.commands import CommandSender, command_states
from cloud_bridge.registry import Registry
from demokit.models import DemoModel
from devservers import Mosquitto
from edge_node.app import EdgeNode
from edge_node.config import load_config as load_edge_config
from edge_node.errors import CommandRejected
from edge_node.ota.agent import OtaAgent
from edge_node.ota.download import Downloader
from edge_node.ota.guard import CommandGuard, GuardPolicy
from edge_node.ota.staging import Artifact, Staging
from schemas import (
    Command,
    CommandAck,
    ModelChunk,
    ModelChunkRequest,
    ModelRef,
    ModelUpdate,
    Topics,
    decode,
    encode,
    new_msg_id,
)
from schemas.signing import (
    Ed25519PrivateKey,
    generate_private_key,
    key_id_of,
    load_private_key,
    parse_public_key,
    public_key_b64,
    sign_command,
    write_private_key,
)
from schemas.topics import Channel
from tests.config_files import write_bridge_config, write_toml
from tests.edge_harness import RunningNode, edge_config, wait_connected
from tests.mqtt_collector import Collector
from tests.plugin_servers import TcpProxyFactory
from tests.poll import wait_for_async
from tests.processes import CLOUD_BRIDGE, running

# Generous: the first test also builds the session's demo models (sklearn training, slow on a busy machine).
pytestmark = pytest.mark.timeout(240)

TOPICS = Topics()
FLEET, DEVICE = "f1", "dev-1"
CHUNK = 4096


# ---- helpers ---------------------------------------------------------------------------------


class RecordingInstaller:
    """Stand-in for edge_node/ota/installer.py: remembers what it was handed and acks "done"."""

    def __init__(self) -> None:
        self.node: EdgeNode | None = None
        self.installed: list[tuple[Path, Command, bytes]] = []
        self.event = asyncio.Event()

    async def install(self, model_path: Path, command: Command) -> None:
        self.installed.append((model_path, command, await asyncio.to_thread(model_path.read_bytes)))
        assert self.node is not None and self.node.ota is not None
        await self.node.ota.acks.send(command, "done")
        self.event.set()

    async def rollback(self, command: Command) -> None:
        assert self.node is not None and self.node.ota is not None
        await self.node.ota.acks.send(command, "rolled_back")


def make_node(config: Any) -> tuple[RunningNode, RecordingInstaller]:
    running = RunningNode(config)
    installer = RecordingInstaller()
    installer.node = running.node
    running.node.installer = installer
    return running, installer


def agent(node: EdgeNode) -> OtaAgent:
    assert node.ota is not None
    return node.ota


def downloader(node: EdgeNode) -> Downloader:
    return agent(node).downloader


def bitmap_held(state_dir: Path, sha: str) -> set[int]:
    body = json.loads((state_dir / "staging" / f"{sha}.bitmap").read_text())
    have = base64.b64decode(body["have"])
    return {i for i in range(body["chunks"]) if have[i >> 3] & (1 << (i & 7))}


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Ed25519PrivateKey, Path]:
    key = generate_private_key()
    path = tmp_path_factory.mktemp("keys") / "signing.pem"
    write_private_key(key, path)
    return key, path


def bridge_config(tmp_path: Path, broker: Mosquitto, key_path: Path | None, **ota: Any) -> BridgeConfig:
    return BridgeConfig(
        state_dir=str(tmp_path / "bridge"),
        mqtt=MqttConfig(host=broker.host, port=broker.port, client_id=f"bridge-{tmp_path.name[-20:]}"),
        fleet=FleetConfig(share_group="ota"),
        ota=OtaConfig(signing_key=None if key_path is None else str(key_path), chunk_size=CHUNK, **ota),
    )


def node_config(tmp_path: Path, port: int, model: Path, key: Ed25519PrivateKey, **ota: Any) -> Any:
    settings: dict[str, Any] = {
        "trusted_keys": {key_id_of(key): public_key_b64(key)},
        "chunk_timeout_s": 0.5,
        "chunk_timeout_max_s": 2.0,
    }
    settings.update(ota)
    return edge_config(tmp_path, port, model, ota=settings)


@pytest.fixture
async def bridge(
    tmp_path: Path, mosquitto: Mosquitto, signing_key: tuple[Ed25519PrivateKey, Path]
) -> AsyncIterator[Bridge]:
    async with running_bridge(bridge_config(tmp_path, mosquitto, signing_key[1])) as b:
        yield b


async def register(bridge: Bridge, path: Path) -> ModelRecord:
    return await bridge.models.add(path, "digits-cloud", "2.0.0")


def sender(bridge: Bridge) -> CommandSender:
    assert bridge.commands is not None
    return bridge.commands


# ---- model store -------------------------------------------------------------------------------


async def test_model_store_add_reads_metadata_and_refuses_changed_bytes(
    tmp_path: Path, demo_models: dict[str, DemoModel]
) -> None:
    registry = Registry(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    await registry.create()
    store = ModelStore(tmp_path / "models", registry)
    try:
        cloud = demo_models["cloud"]
        record = await store.add(cloud.path)
        assert (record.name, record.version) == (cloud.name, cloud.version)
        assert record.sha256 == hashlib.sha256(cloud.path.read_bytes()).hexdigest()
        assert record.path == tmp_path / "models" / f"{record.sha256}.onnx"
        assert record.path.read_bytes() == cloud.path.read_bytes()
        assert record.labels == cloud.labels and record.input_shape == (-1, 64)
        assert abs(sum(record.reference_mix.values()) - 1.0) < 1e-3
        assert record.ref.sha256 == record.sha256
        assert await store.add(cloud.path) == record  # same bytes: a no-op
        with pytest.raises(ModelStoreError, match="immutable"):
            await store.add(demo_models["edge"].path, cloud.name, cloud.version)
        assert await store.get_by_sha(record.sha256) == record
        assert await store.get_by_sha("0" * 64) is None
        with pytest.raises(ModelStoreError, match="not registered"):
            await store.get(cloud.name, "9.9.9")
        garbage = tmp_path / "garbage.onnx"
        garbage.write_bytes(b"not a model")
        with pytest.raises(ModelStoreError, match=r"garbage\.onnx is not an ONNX model"):
            await store.add(garbage, "x", "1")
        assert [r.version for r in await store.list()] == [cloud.version]
    finally:
        await registry.close()


# ---- delivery ----------------------------------------------------------------------------------


async def test_signed_update_is_chunked_verified_and_handed_to_the_installer(
    tmp_path: Path,
    mosquitto: Mosquitto,
    bridge: Bridge,
    demo_models: dict[str, DemoModel],
    signing_key: tuple[Ed25519PrivateKey, Path],
) -> None:
    record = await register(bridge, demo_models["cloud"].path)
    chunks = -(-record.size // CHUNK)
    assert chunks > 40
    config = node_config(tmp_path, mosquitto.port, demo_models["edge"].path, signing_key[0])
    running, installer = make_node(config)
    async with running as node:
        await wait_connected(node)
        command = await sender(bridge).send_update(FLEET, DEVICE, record, rollout_id="r1", stage=0)
        async with asyncio.timeout(30):
            await installer.event.wait()
        path, handed, data = installer.installed[0]
        assert handed.cmd_id == command.cmd_id
        assert path == config.ota_state_dir / "models" / f"{record.sha256}.onnx"
        assert hashlib.sha256(data).hexdigest() == record.sha256 and len(data) == record.size
        assert list(config.ota_state_dir.glob("staging/*")) == []
        stats = downloader(node).stats
        assert stats.requested[0] == list(range(chunks)) and stats.chunks_written == chunks
        assert stats.bad_chunks == 0
        assert bridge.chunks is not None and bridge.chunks.stats.chunks_sent == chunks

        async def final_state() -> str | None:
            states = await command_states(bridge.registry, device_id=DEVICE)
            return states[0].state if states else None

        await wait_for_async(
            final_state, 20, "the done ack in the registry", until=lambda state: state == "done", interval=0.05
        )
        (state,) = await command_states(bridge.registry, rollout_id="r1")
        assert (state.cmd_id, state.action, state.model_version, state.stage) == (
            command.cmd_id,
            "model_update",
            "2.0.0",
            0,
        )
        assert agent(node).acks.sent["received"] == 1
        # Progress is rate-limited to one ack per 10% step (fewer when a batch of chunks spans steps).
        assert 1 <= agent(node).acks.sent["downloading"] <= 9


async def test_a_model_already_in_the_store_is_not_downloaded_again(
    tmp_path: Path,
    mosquitto: Mosquitto,
    bridge: Bridge,
    demo_models: dict[str, DemoModel],
    signing_key: tuple[Ed25519PrivateKey, Path],
) -> None:
    record = await register(bridge, demo_models["cloud"].path)
    config = node_config(tmp_path, mosquitto.port, demo_models["edge"].path, signing_key[0])
    store = config.ota_state_dir / "models"
    store.mkdir(parents=True)
    shutil.copy(record.path, store / f"{record.sha256}.onnx")
    running, installer = make_node(config)
    async with running as node:
        await wait_connected(node)
        await sender(bridge).send_update(FLEET, DEVICE, record)
        async with asyncio.timeout(20):
            await installer.event.wait()
        assert downloader(node).stats.reused == 1 and downloader(node).stats.requested == []
        assert bridge.chunks is not None and bridge.chunks.stats.requests == 0


def fine_tuned(base: Path, out: Path, version: str = "1.1.0") -> Path:
    """`base` with a retrained output bias (as a head-only fine-tune changes little): the bytes
    differ in a few places, so a patch is far smaller than the model."""
    model = onnx.load(base)
    (bias,) = [init for init in model.graph.initializer if init.name == "B1"]
    values = numpy_helper.to_array(bias) + np.float32(0.05)
    bias.CopyFrom(numpy_helper.from_array(values.astype(np.float32), "B1"))
    for prop in model.metadata_props:
        if prop.key == "model_version":
            prop.value = version
    onnx.save(model, out)
    return out


async def device_runs(bridge: Bridge, sha256: str) -> None:
    """Wait until the registry knows the device runs `sha256` (from its status and telemetry)."""
    await wait_for_async(
        lambda: bridge.registry.device_model(FLEET, DEVICE),
        20,
        f"the registry to show {DEVICE} running {sha256}",
        until=lambda got: got == sha256,
        interval=0.05,
    )


async def test_an_update_close_to_the_running_model_travels_as_a_patch(
    tmp_path: Path,
    mosquitto: Mosquitto,
    bridge: Bridge,
    demo_models: dict[str, DemoModel],
    signing_key: tuple[Ed25519PrivateKey, Path],
) -> None:
    """The registry knows the device runs the base model and the store has it: the command offers a
    bsdiff patch, the device fetches only the patch, rebuilds the new model from its own copy and
    hands the installer exactly the registered bytes."""
    base = await bridge.models.add(demo_models["edge"].path)
    target = await bridge.models.add(fine_tuned(demo_models["edge"].path, tmp_path / "tuned.onnx"))
    config = node_config(tmp_path, mosquitto.port, demo_models["edge"].path, signing_key[0])
    running, installer = make_node(config)
    async with running as node:
        await wait_connected(node)
        await device_runs(bridge, base.sha256)
        command = await sender(bridge).send_update(FLEET, DEVICE, target)
        assert command.update is not None and command.update.delta is not None
        delta = command.update.delta
        assert delta.base_sha256 == base.sha256 and delta.size < target.size // 4
        async with asyncio.timeout(30):
            await installer.event.wait()
        path, _, data = installer.installed[0]
        assert data == target.path.read_bytes() and path == config.ota_state_dir / "models" / f"{target.sha256}.onnx"
        stats = downloader(node).stats
        assert (stats.patched, stats.patch_fallbacks) == (1, 0)
        assert stats.requested == [list(range(delta.chunks))]  # the patch's chunks, none of the model's
        assert bridge.chunks is not None and bridge.chunks.stats.bytes_sent == delta.size
        assert list(config.ota_state_dir.glob("staging/*")) == []


async def test_a_patch_that_does_not_verify_falls_back_to_the_whole_model(
    tmp_path: Path,
    mosquitto: Mosquitto,
    bridge: Bridge,
    demo_models: dict[str, DemoModel],
    signing_key: tuple[Ed25519PrivateKey, Path],
) -> None:
    """A patch file damaged on the bridge's disk: its chunks hash to what the bridge sends, but the
    whole patch is not the one the signed command names, so the device discards it and fetches the
    model itself."""
    base = await bridge.models.add(demo_models["edge"].path)
    target = await bridge.models.add(fine_tuned(demo_models["edge"].path, tmp_path / "tuned.onnx"))
    patch = await bridge.deltas.delta(base, target)
    assert patch is not None
    config = node_config(tmp_path, mosquitto.port, demo_models["edge"].path, signing_key[0])
    running, installer = make_node(config)
    async with running as node:
        await wait_connected(node)
        await device_runs(bridge, base.sha256)
        command = await sender(bridge).send_update(FLEET, DEVICE, target)
        assert command.update is not None and command.update.delta is not None
        patch.path.write_bytes(bytes(b ^ 0xFF for b in patch.path.read_bytes()))  # same size, other bytes
        async with asyncio.timeout(30):
            await installer.event.wait()
        assert installer.installed[0][2] == target.path.read_bytes()
        stats = downloader(node).stats
        assert (stats.patched, stats.patch_fallbacks, stats.verify_failures) == (0, 1, 1)
        assert stats.requested[-1] == list(range(-(-target.size // CHUNK)))  # then the whole model


async def test_no_patch_when_it_would_not_be_much_smaller_and_the_answer_is_kept(
    tmp_path: Path, bridge: Bridge, demo_models: dict[str, DemoModel]
) -> None:
    edge = await bridge.models.add(demo_models["edge"].path)
    cloud = await bridge.models.add(demo_models["cloud"].path)
    assert await bridge.deltas.delta(edge, cloud) is None  # two different trainings: no common bytes
    index = bridge.deltas.root / f"{edge.sha256}-{cloud.sha256}.json"
    assert json.loads(index.read_text())["sha256"] is None  # so bsdiff does not run again for the pair
    assert await bridge.deltas.delta(edge, edge) is None
    tuned = await bridge.models.add(fine_tuned(demo_models["edge"].path, tmp_path / "tuned.onnx"))
    first = await bridge.deltas.delta(edge, tuned)
    assert first is not None and first == await bridge.deltas.delta(edge, tuned)
    assert bridge.deltas.find(first.sha256) is not None and bridge.deltas.find("0" * 64) is None


async def test_cut_link_mid_transfer_re_requests_only_missing_chunks(
    tmp_path: Path,
    mosquitto: Mosquitto,
    tcp_proxy: TcpProxyFactory,
    demo_models: dict[str, DemoModel],
    signing_key: tuple[Ed25519PrivateKey, Path],
) -> None:
    proxy = tcp_proxy(mosquitto.host, mosquitto.port)
    cfg = bridge_config(tmp_path, mosquitto, signing_key[1], max_chunks_per_s=40.0)
    config = node_config(tmp_path, proxy.port, demo_models["edge"].path, signing_key[0])
    async with running_bridge(cfg) as bridge:
        record = await register(bridge, demo_models["cloud"].path)
        chunks = -(-record.size // CHUNK)
        running, installer = make_node(config)
        async with running as node:
            await wait_connected(node)
            await sender(bridge).send_update(FLEET, DEVICE, record)
            await wait_for_async(lambda: downloader(node).stats.chunks_written >= 8, 20, "the first chunks")
            proxy.refuse()
            proxy.reset()
            held_at_cut = bitmap_held(config.ota_state_dir, record.sha256)
            assert 8 <= len(held_at_cut) < chunks
            # No progress while cut: the device asks again (queued in its outbox until reconnected).
            await wait_for_async(lambda: downloader(node).stats.rerequests >= 1, 20, "a re-request while cut")
            proxy.restore()
            async with asyncio.timeout(40):
                await installer.event.wait()
            assert hashlib.sha256(installer.installed[0][2]).hexdigest() == record.sha256
            assert node.link is not None and node.link.stats.reconnects >= 1
            first, *later = downloader(node).stats.requested
            assert first == list(range(chunks)) and later
            for request in later:
                assert not set(request) & held_at_cut, "re-asked for a chunk it already had"
            assert bridge.chunks is not None and bridge.chunks.stats.chunks_sent < 2 * chunks


async def test_restart_mid_download_resumes_from_the_bitmap(
    tmp_path: Path,
    mosquitto: Mosquitto,
    demo_models: dict[str, DemoModel],
    signing_key: tuple[Ed25519PrivateKey, Path],
) -> None:
    cfg = bridge_config(tmp_path, mosquitto, signing_key[1], max_chunks_per_s=40.0)
    config = node_config(tmp_path, mosquitto.port, demo_models["edge"].path, signing_key[0])
    async with running_bridge(cfg) as bridge:
        record = await register(bridge, demo_models["cloud"].path)
        chunks = -(-record.size // CHUNK)
        first_run, _ = make_node(config)
        async with first_run as node:
            await wait_connected(node)
            command = await sender(bridge).send_update(FLEET, DEVICE, record)
            await wait_for_async(lambda: downloader(node).stats.chunks_written >= 8, 20, "the first chunks")
        held = bitmap_held(config.ota_state_dir, record.sha256)
        assert 8 <= len(held) < chunks
        second_run, installer = make_node(config)
        async with second_run as node:
            async with asyncio.timeout(40):
                await installer.event.wait()
            stats = downloader(node).stats
            assert stats.resumed == 1
            assert sorted(stats.requested[0]) == sorted(set(range(chunks)) - held)
            _path, handed, data = installer.installed[0]
            assert handed.cmd_id == command.cmd_id
            assert hashlib.sha256(data).hexdigest() == record.sha256


async def test_a_newer_update_supersedes_a_download_in_progress(
    tmp_path: Path,
    mosquitto: Mosquitto,
    demo_models: dict[str, DemoModel],
    signing_key: tuple[Ed25519PrivateKey, Path],
) -> None:
    cfg = bridge_config(tmp_path, mosquitto, signing_key[1], max_chunks_per_s=40.0)
    config = node_config(tmp_path, mosquitto.port, demo_models["edge"].path, signing_key[0])
    watched = [TOPICS.filter(Channel.CMD)]
    async with running_bridge(cfg) as bridge:
        big = await register(bridge, demo_models["cloud"].path)
        small = await bridge.models.add(demo_models["edge"].path, "digits-edge", "1.1.0")
        running, installer = make_node(config)
        with Collector(mosquitto.host, mosquitto.port, watched, client_id="cmds") as cmds:
            async with running as node:
                await wait_connected(node)
                first = await sender(bridge).send_update(FLEET, DEVICE, big)
                await wait_for_async(lambda: downloader(node).stats.chunks_written >= 3, 20, "the first download")
                second = await sender(bridge).send_update(FLEET, DEVICE, small)
                async with asyncio.timeout(30):
                    await installer.event.wait()
                assert [c.cmd_id for _, c, _ in installer.installed] == [second.cmd_id]
                assert hashlib.sha256(installer.installed[0][2]).hexdigest() == small.sha256
                assert agent(node).stats.superseded == 1
                states = {s.cmd_id: s for s in await _final_states(bridge, 2)}
                assert states[first.cmd_id].state == "failed"
                assert (states[first.cmd_id].reason or "").startswith("superseded")
                assert states[second.cmd_id].state == "done"
        # Commands are QoS 1, not retained, and expire at the broker with the command (MQTT 5).
        for received in cmds.on("cmd"):
            assert not received.retain
            expiry = received.properties.MessageExpiryInterval
            assert cfg.ota.command_ttl_s - 60 <= expiry <= cfg.ota.command_ttl_s


async def _final_states(bridge: Bridge, count: int) -> list[Any]:
    return await wait_for_async(
        lambda: command_states(bridge.registry, device_id=DEVICE),
        20,
        f"{count} final acks",
        until=lambda states: len(states) >= count and all(s.final for s in states),
        interval=0.05,
    )


async def test_corrupt_and_forged_chunks_are_refused_and_a_forged_file_never_lands(
    tmp_path: Path,
    mosquitto: Mosquitto,
    demo_models: dict[str, DemoModel],
    signing_key: tuple[Ed25519PrivateKey, Path],
) -> None:
    """No bridge: the test answers the device's chunk requests itself, first with broken chunks, then
    with well-formed chunks of other bytes: each chunk hashes right, the whole file does not."""
    key = signing_key[0]
    real = demo_models["cloud"].path.read_bytes()
    sha = hashlib.sha256(real).hexdigest()
    record = ModelRecord("digits-cloud", "2.0.0", sha, len(real), demo_models["cloud"].path, (), (), {}, 0.0)
    sender_ = CommandSender(TOPICS, key, None, _no_publish, CHUNK, 600)
    command = sender_.build(FLEET, DEVICE, "model_update", update=sender_.model_update(FLEET, record))
    chunks = command.update.chunks if command.update else 0
    forged = bytes(b ^ 0x5A for b in real)

    def chunk(index: int, data: bytes, **overrides: Any) -> bytes:
        message = ModelChunk(
            msg_id=new_msg_id(),
            fleet_id=FLEET,
            device_id=DEVICE,
            ts=time.time(),
            sha256=sha,
            index=index,
            chunks=chunks,
            chunk_sha256=hashlib.sha256(data).hexdigest(),
            data=base64.b64encode(data).decode(),
        )
        return encode(msgspec.structs.replace(message, **overrides))

    config = node_config(tmp_path, mosquitto.port, demo_models["edge"].path, key)
    running, installer = make_node(config)
    topic = TOPICS.model_chunks(FLEET, sha)
    watched = [TOPICS.filter(Channel.CMD_ACK), TOPICS.filter(Channel.MODEL_REQUEST)]
    with Collector(mosquitto.host, mosquitto.port, watched, client_id="acks") as acks:
        async with running as node:
            await wait_connected(node)
            acks.publish(TOPICS.device(FLEET, DEVICE, Channel.CMD), encode(command))
            # The device subscribes to the chunk topic before it asks: once its request is out, the
            # subscription is active and the chunks below reach it.
            await asyncio.to_thread(acks.wait_for, lambda c: bool(c.on("request")), 20)
            piece = real[:CHUNK]
            acks.publish(topic, chunk(0, piece, chunk_sha256=hashlib.sha256(b"other").hexdigest()))
            acks.publish(topic, chunk(0, piece[:-1]))  # short, with a matching hash
            acks.publish(topic, chunk(0, piece, chunks=chunks + 1))
            acks.publish(topic, chunk(0, piece, sha256="ab" * 32))  # other model on this topic
            await wait_for_async(lambda: downloader(node).stats.bad_chunks >= 4, 20, "4 refused chunks")
            assert downloader(node).stats.chunks_written == 0
            for index in range(chunks):
                acks.publish(topic, chunk(index, forged[index * CHUNK : (index + 1) * CHUNK]))
            await asyncio.to_thread(
                acks.wait_for, lambda c: any(_ack(r.payload).state == "failed" for r in c.on("ack")), 20
            )
        failed = next(a for a in map(_ack, (r.payload for r in acks.on("ack"))) if a.state == "failed")
        assert failed.reason is not None and failed.reason.startswith("verify_failed")
        assert not installer.installed
        assert not (config.ota_state_dir / "models" / f"{sha}.onnx").exists()
        assert list((config.ota_state_dir / "staging").glob("*")) == []


async def _no_publish(topic: str, payload: bytes, qos: int, expiry: int | None) -> None:
    raise AssertionError("this sender only builds commands")


def _ack(payload: bytes) -> CommandAck:
    return decode(payload, CommandAck)


async def test_chunk_server_coalesces_devices_and_counts_bad_requests_without_a_signing_key(
    tmp_path: Path, mosquitto: Mosquitto, demo_models: dict[str, DemoModel]
) -> None:
    """Two devices behind one gateway ask for the same model at once: each chunk goes out once.
    A request for an unknown model and an undecodable one are counted; the bridge keeps serving."""
    cfg = bridge_config(tmp_path, mosquitto, None, max_chunks_per_s=100.0)
    async with running_bridge(cfg) as bridge:
        assert bridge.commands is None  # no signing key: OTA commands disabled, chunks still served
        record = await register(bridge, demo_models["cloud"].path)
        chunks = -(-record.size // CHUNK)
        topic = TOPICS.model_chunks(FLEET, record.sha256)
        with Collector(mosquitto.host, mosquitto.port, [topic], client_id="gateway") as gateway:

            def ask(device: str, sha: str) -> None:
                request = ModelChunkRequest(
                    msg_id=new_msg_id(),
                    fleet_id=FLEET,
                    device_id=device,
                    ts=time.time(),
                    cmd_id=new_msg_id(),
                    sha256=sha,
                    chunks=list(range(chunks)),
                )
                gateway.publish(TOPICS.device(FLEET, device, Channel.MODEL_REQUEST), encode(request))

            ask("dev-a", record.sha256)
            ask("dev-b", record.sha256)
            ask("dev-c", "0" * 64)
            gateway.publish(TOPICS.device(FLEET, "dev-d", Channel.MODEL_REQUEST), b'{"schema": "model_request/1"}')
            await asyncio.to_thread(gateway.wait_for, lambda c: len(c.received) >= chunks, 30)
            assert bridge.chunks is not None
            stats = bridge.chunks.stats
            await wait_for_async(lambda: stats.requests == 3 and stats.dead_letters == 2, 20, "all requests handled")
            assert stats.unknown_models == 1 and stats.bad_requests == 1
            # Nothing queued or awaiting its PUBACK: a duplicate would have been sent by now.
            await wait_for_async(lambda: bridge.chunks is not None and bridge.chunks.backlog == 0, 20, "empty backlog")
            got = sorted(decode(r.payload, ModelChunk).index for r in gateway.received)
            assert got == list(range(chunks)) and stats.chunks_sent == chunks
            assert stats.coalesced >= chunks
            data = b"".join(
                base64.b64decode(m.data)
                for m in sorted((decode(r.payload, ModelChunk) for r in gateway.received), key=lambda m: m.index)
            )
            assert hashlib.sha256(data).hexdigest() == record.sha256


def test_staging_trusts_only_bitmapped_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK + 100)
    sha = hashlib.sha256(data).hexdigest()
    update = ModelUpdate(
        model=ModelRef(name="m", version="1", sha256=sha),
        size=len(data),
        chunk_size=CHUNK,
        chunks=4,
        chunk_topic=TOPICS.model_chunks(FLEET, sha),
    )
    part = tmp_path / f"{sha}.part"
    part.write_bytes(b"left over from who knows what" * 1000)
    staging = Staging(tmp_path, Artifact.model(update))
    assert staging.load() == 0 and part.stat().st_size == 0  # no bitmap vouches for those bytes
    staging.write([(3, data[3 * CHUNK :]), (1, data[CHUNK : 2 * CHUNK])])
    resumed = Staging(tmp_path, Artifact.model(update))
    assert resumed.load() == 2 and resumed.missing() == [0, 2]
    other = msgspec.structs.replace(update, size=len(data) - 1)
    assert Staging(tmp_path, Artifact.model(other)).load() == 0  # a bitmap of another size is not this download
    staging = Staging(tmp_path, Artifact.model(update))
    assert staging.load() == 0
    staging.write([(i, data[i * CHUNK : (i + 1) * CHUNK]) for i in range(4)])
    dest = tmp_path / "store" / f"{sha}.onnx"
    assert staging.finish(dest) is None and dest.read_bytes() == data and not part.exists()
    # Right chunk count and sizes, other bytes: the whole-file check refuses it and nothing lands.
    forged = Staging(tmp_path, Artifact.model(update))
    forged.load()
    forged.write([(i, bytes(len(data[i * CHUNK : (i + 1) * CHUNK]))) for i in range(4)])
    problem = forged.finish(tmp_path / "store2" / f"{sha}.onnx")
    assert problem is not None and "sha256" in problem
    assert not (tmp_path / "store2").exists() and not part.exists()


# ---- command guard -----------------------------------------------------------------------------


async def test_bad_commands_are_rejected_with_the_reason(
    tmp_path: Path,
    mosquitto: Mosquitto,
    demo_models: dict[str, DemoModel],
    signing_key: tuple[Ed25519PrivateKey, Path],
) -> None:
    key = signing_key[0]
    other = generate_private_key()
    good = CommandSender(TOPICS, key, None, _no_publish, CHUNK, 600)
    now = time.time()
    ping = good.build(FLEET, DEVICE, "ping")
    cases: dict[str, Command] = {
        "unknown_key": CommandSender(TOPICS, other, None, _no_publish).build(FLEET, DEVICE, "ping"),
        # Signed by another key that claims the trusted key's id.
        "bad_signature": CommandSender(TOPICS, other, key_id_of(key), _no_publish).build(FLEET, DEVICE, "ping"),
        "unsigned": msgspec.structs.replace(good.build(FLEET, DEVICE, "ping"), signature=""),
        "expired": good.build(FLEET, DEVICE, "ping", now=now - 4000),
        "wrong_device": good.build(FLEET, "dev-2", "ping"),
        "tampered": msgspec.structs.replace(good.build(FLEET, DEVICE, "ping"), action="rollback"),
    }
    config = node_config(tmp_path, mosquitto.port, demo_models["edge"].path, key, max_clock_skew_s=5.0)
    running, _ = make_node(config)
    cmd_topic = TOPICS.device(FLEET, DEVICE, Channel.CMD)
    with Collector(mosquitto.host, mosquitto.port, [TOPICS.filter(Channel.CMD_ACK)], client_id="acks") as acks:
        async with running as node:
            await wait_connected(node)
            for command in [*cases.values(), ping, ping]:  # the second ping is a replay
                acks.publish(cmd_topic, encode(command))

            def by_cmd() -> dict[str, list[CommandAck]]:
                out: dict[str, list[CommandAck]] = {}
                for r in acks.on("ack"):
                    ack = _ack(r.payload)
                    out.setdefault(ack.cmd_id, []).append(ack)
                return out

            await asyncio.to_thread(acks.wait_for, lambda c: sum(map(len, by_cmd().values())) >= 9, 20)
            got = by_cmd()
            for code, command in cases.items():
                (ack,) = got[command.cmd_id]
                expected = "bad_signature" if code == "tampered" else code
                assert ack.state == "rejected" and ack.reason is not None, (code, ack)
                assert ack.reason.startswith(expected + ":"), (code, ack.reason)
            states = [a.state for a in got[ping.cmd_id]]
            assert sorted(states) == ["done", "received", "rejected"] and states.index("received") < states.index(
                "done"
            )
            (replay,) = [a for a in got[ping.cmd_id] if a.state == "rejected"]
            assert replay.reason is not None and replay.reason.startswith("replayed:")
            rejected = agent(node).guard.rejected
            assert rejected["bad_signature"] == 2 and rejected["replayed"] == 1 and sum(rejected.values()) == 7


def test_guard_remembers_accepted_commands_across_restarts(
    tmp_path: Path, signing_key: tuple[Ed25519PrivateKey, Path]
) -> None:
    key = signing_key[0]
    trusted = {key_id_of(key): key.public_key()}
    policy = GuardPolicy(FLEET, DEVICE, max_clock_skew_s=5.0, replay_window_s=3600.0)
    good = CommandSender(TOPICS, key, None, _no_publish)
    first = good.build(FLEET, DEVICE, "ping")
    guard = CommandGuard(tmp_path, trusted, policy)
    guard.check(first)
    asyncio.run(guard.accept(first))
    restarted = CommandGuard(tmp_path, trusted, policy)
    with pytest.raises(CommandRejected, match=r"^replayed: .* already accepted"):
        restarted.check(first)
    # Issued long before the newest accepted one (its id may be forgotten): refused by the window.
    newer = good.build(FLEET, DEVICE, "ping", now=time.time() + 3)
    asyncio.run(restarted.accept(newer))
    old = msgspec.structs.replace(
        good.build(FLEET, DEVICE, "ping", now=time.time() - 4000), expires_at=time.time() + 60
    )
    old = sign_command(old, key)
    with pytest.raises(CommandRejected, match=r"^replayed: .* before the newest"):
        restarted.check(old)
    assert restarted.rejected["replayed"] == 2


# ---- CLI ---------------------------------------------------------------------------------------


def test_cli_keys_generate_writes_a_private_key_and_prints_the_device_snippet(
    tmp_path: Path, demo_models: dict[str, DemoModel]
) -> None:
    out = subprocess.run(
        [*CLOUD_BRIDGE, "keys", "generate", "--out", str(tmp_path / "keys")],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    pem = tmp_path / "keys" / "command-signing.pem"
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    # The last printed line goes under [ota.trusted_keys].
    snippet = out.stdout.strip().splitlines()[-1]
    edge_toml = tmp_path / "edge.toml"
    edge_toml.write_text(
        f'[device]\nfleet_id = "{FLEET}"\ndevice_id = "{DEVICE}"\n[model]\npath = "{demo_models["edge"].path}"\n'
        f"[ota.trusted_keys]\n{snippet}\n",
        encoding="utf-8",
    )
    config = load_edge_config(edge_toml, environ={})
    (key_id,) = config.ota.trusted_keys
    assert key_id in out.stdout and config.ota.trusted_keys[key_id] in out.stdout
    # The printed public key verifies what the private key signs.
    signed = CommandSender(TOPICS, load_private_key(pem), None, _no_publish).build(FLEET, DEVICE, "ping")
    guard = CommandGuard(
        tmp_path / "guard", {key_id: parse_public_key(config.ota.trusted_keys[key_id])}, GuardPolicy(FLEET, DEVICE)
    )
    guard.check(signed)
    again = subprocess.run(
        [*CLOUD_BRIDGE, "keys", "generate", "--out", str(tmp_path / "keys")], capture_output=True, text=True, timeout=30
    )
    assert again.returncode == 1 and "already exists" in again.stderr
    env_config = load_edge_config(edge_toml, environ={"EDGE_NODE__OTA__TRUSTED_KEYS": f"k1={_b64(pem)},k2={_b64(pem)}"})
    assert set(env_config.ota.trusted_keys) == {"k1", "k2"}


def _b64(pem: Path) -> str:
    return public_key_b64(load_private_key(pem))


def test_cli_models_add_and_list(tmp_path: Path, demo_models: dict[str, DemoModel]) -> None:
    config = write_bridge_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cloud = demo_models["cloud"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLOUD_BRIDGE, *args, "--config", str(config)], capture_output=True, text=True, timeout=60, env=env
        )

    added = cli("models", "add", str(cloud.path))
    assert added.returncode == 0, added.stderr
    assert f"added {cloud.name} {cloud.version} sha256={cloud.sha256}" in added.stdout
    assert (tmp_path / "state" / "models" / f"{cloud.sha256}.onnx").read_bytes() == cloud.path.read_bytes()
    renamed = cli("models", "add", str(demo_models["edge"].path), "--name", "tiny", "--version", "0.1")
    assert renamed.returncode == 0, renamed.stderr
    assert f"declares model_version {demo_models['edge'].version}; registering it as 0.1" in renamed.stderr
    # README's old mistake: the same file under a second version is allowed, but said out loud.
    again = cli("models", "add", str(demo_models["edge"].path), "--name", "tiny", "--version", "0.2")
    assert again.returncode == 0 and "byte for byte tiny 0.1" in again.stderr
    clash = cli("models", "add", str(demo_models["edge"].path), "--name", cloud.name, "--version", cloud.version)
    assert clash.returncode == 1 and "immutable" in clash.stderr
    listed = cli("models", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "VERSION", "SHA256", "SIZE"]
    rows = {tuple(line.split()[:2]): line for line in lines[1:]}
    assert set(rows) == {(cloud.name, cloud.version), ("tiny", "0.1"), ("tiny", "0.2")}
    assert cloud.sha256[:16] in rows[(cloud.name, cloud.version)]


async def test_cli_cmd_ping_waits_for_the_done_ack(
    tmp_path: Path,
    mosquitto: Mosquitto,
    demo_models: dict[str, DemoModel],
    signing_key: tuple[Ed25519PrivateKey, Path],
) -> None:
    config = write_bridge_config(tmp_path, mosquitto, ota={"signing_key": signing_key[1]})
    argv = [*CLOUD_BRIDGE, "cmd", "ping", "--device", f"{FLEET}/{DEVICE}", "--config", str(config), "--timeout", "20"]
    started, _ = make_node(node_config(tmp_path, mosquitto.port, demo_models["edge"].path, signing_key[0]))
    async with started as node:
        await wait_connected(node)
        with running("cmd-ping", argv, tmp_path / "ping-stderr.log", stdout_pipe=True) as proc:
            assert proc.popen is not None and proc.popen.stdout is not None
            returncode = await asyncio.to_thread(proc.wait, 40)
            text = proc.popen.stdout.read().decode()  # a few lines: they fit in the pipe until it exits
            stderr = proc.log_text()
    assert returncode == 0, stderr
    assert "sent ping cmd_id=" in text and "ack state=received" in text and "ack state=done" in text


# ---- config ------------------------------------------------------------------------------------


def test_bridge_ota_config_defaults_overrides_and_errors(tmp_path: Path) -> None:
    from cloud_bridge.config import load_config
    from cloud_bridge.errors import ConfigError

    config = load_config(None, env={"CLOUD_BRIDGE__STATE_DIR": str(tmp_path)})
    assert config.ota.signing_key is None and config.ota.chunk_size == 65536
    assert config.model_store_dir == tmp_path / "models"
    env = {"CLOUD_BRIDGE__STATE_DIR": str(tmp_path), "CLOUD_BRIDGE__OTA__CHUNK_SIZE": "4096"}
    assert load_config(None, env=env).ota.chunk_size == 4096
    with pytest.raises(ConfigError, match=r"\[ota\] chunk_size = 512"):
        load_config(None, env={**env, "CLOUD_BRIDGE__OTA__CHUNK_SIZE": "512"})
    with pytest.raises(ConfigError, match=r"\[ota\] signing_key .* `cloud-bridge keys generate"):
        load_config(None, env={**env, "CLOUD_BRIDGE__OTA__SIGNING_KEY": str(tmp_path / "missing.pem")})


def test_edge_ota_config_trusted_keys_and_errors(tmp_path: Path) -> None:
    from edge_node.errors import ConfigError

    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    key = public_key_b64(generate_private_key())
    tables = {
        "device": {"fleet_id": "f1", "device_id": "d1"},
        "model": {"path": model},
        "outbox": {"path": "state/outbox.sqlite"},  # relative: to the file's folder
        "ota": {"trusted_keys": {"k1": key}},
    }
    path = write_toml(tmp_path / "edge.toml", tables)
    config = load_edge_config(path, environ={})
    assert config.ota.trusted_keys == {"k1": key}
    assert config.ota_state_dir == tmp_path / "state" / "ota"
    with pytest.raises(ConfigError, match=r"\[ota\] trusted_keys 'bad'.*base64"):
        load_edge_config(path, environ={"EDGE_NODE__OTA__TRUSTED_KEYS": "bad=!!!"})
    with pytest.raises(ConfigError, match=r"\[ota\] trusted_keys must be"):
        load_edge_config(path, environ={"EDGE_NODE__OTA__TRUSTED_KEYS": "no-equals-sign"})
