"""OTA through a bridged gateway, end to end (issue 6, Tests).

Everything real: the shipped brokers (mosquitto/cloud.conf, mosquitto/gateway.conf, the shipped ACL,
credentials from scripts/gen-certs.sh), the gateway->cloud LTE link through a TcpProxy over mutual TLS,
the cloud bridge (model store, signed commands, chunk server, ingestion into a SQLite registry) and
two edge nodes as separate `edge-node run` processes that authenticate to the gateway with their own
accounts and replay the digits at a steady rate with the real A/B slot installer.

1. A signed update of the edge model goes to both devices in 4 KB chunks (rate-limited, so a transfer
   takes seconds); while the chunks flow the gateway->cloud link is black-holed (a dead radio link),
   then restored. Both devices must end on the new model (ack "done" in the registry), with a
   verified content-store file, having answered every input meanwhile (no gap in inference ids, old
   model then new model, never back), and the chunk server must have sent each chunk a bounded
   number of times (devices behind one gateway share the per-model topic).
2. Commands signed by a key the devices do not trust, sent the same way, are rejected with a reason
   that says why, and the device stays on its model; a genuine command after them is obeyed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import itertools
import json
import signal
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloud_bridge.app import Bridge, running_bridge
from cloud_bridge.config import BridgeConfig, OtaConfig
from cloud_bridge.ota.commands import CommandSender, CommandState, command_states
from cloud_bridge.registry import ResultRow, SeenMessage
from demokit.models import DemoModel, build_edge_model
from devservers import ManagedProcess, Mosquitto, TcpProxy
from schemas import Channel, ModelChunk, ModelChunkRequest, ModelRef, Results, Topics, decode, decode_for_topic
from schemas.signing import Ed25519PrivateKey, generate_private_key, key_id_of, public_key_b64, write_private_key
from tests.broker_stack import Client, CloudBroker, cloud_bridge_config, start_cloud, start_gateway, wait_bridged
from tests.config_files import write_edge_config
from tests.mqtt_collector import Answered
from tests.pki import BRIDGE, Pki
from tests.plugin_servers import MosquittoFactory, TcpProxyFactory
from tests.poll import wait_for_async
from tests.processes import run_edge_node

# The first run trains the new edge model (~30 s on a busy machine; cached afterwards).
pytestmark = pytest.mark.timeout(240)

TOPICS = Topics()
FLEET = "f1"
DEVICES = ("dev-1", "dev-2")
CHUNK = 4096
# LTE-like pacing of the chunk server: the ~11 chunks of the new model take ~3 s, so the cut lands
# in the middle of the transfer.
CHUNKS_PER_S = 4.0
RATE_HZ = 40.0
# Once before the cut, and at most twice more for the chunks lost in the dead link (the devices'
# re-requests during the cut, and one more round if a re-request races the resent chunks).
MAX_SENDS_PER_CHUNK = 3
# The replay source emits every 25 ms; a longer pause than this means inference stopped.
MAX_RESULT_GAP_S = 1.5
_POLL_S = 0.1


# ---- fixtures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Models:
    base: DemoModel  # the factory model every device starts on (digits-edge 1.0.0, 12 hidden units)
    new: DemoModel  # the update (digits-edge 1.1.0, 128 hidden units: ~43 KB, ~11 chunks of 4 KB)


@pytest.fixture(scope="module")
def models() -> Models:
    # Cached across runs in the repo's build dir (like the demo): build_edge_model retrains only when
    # the recorded training config differs. Not the pytest cache, which `-p no:cacheprovider` removes.
    out = Path(__file__).resolve().parents[1] / "build" / "test-models"
    return Models(base=build_edge_model(out, "1.0.0"), new=build_edge_model(out, "1.1.0", hidden=(128,)))


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Ed25519PrivateKey, Path]:
    key = generate_private_key()
    path = tmp_path_factory.mktemp("keys") / "signing.pem"
    write_private_key(key, path)
    return key, path


# ---- the brokers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    cloud: CloudBroker
    link: TcpProxy  # gateway -> cloud, the LTE link
    gateway: Mosquitto


def start_stack(factory: MosquittoFactory, tcp_proxy: TcpProxyFactory, pki: Pki) -> Stack:
    cloud = start_cloud(factory, pki)
    link = tcp_proxy("127.0.0.1", cloud.gateway_port)
    gateway = start_gateway(factory, pki, f"127.0.0.1:{link.port}")
    return Stack(cloud, link, gateway)


def cloud_client(stack: Stack, pki: Pki, client_id: str) -> Client:
    """A client on the cloud's loopback listener: the bridge account without taking over the bridge's
    own connection (the TLS listeners allow one connection per account)."""
    return Client("127.0.0.1", stack.cloud.loopback_port, BRIDGE, pki.password(BRIDGE), client_id=client_id)


def gateway_watcher(stack: Stack, pki: Pki) -> Client:
    """Sees on the gateway what the devices publish (the bridge account may read fleet/# there).

    Also waits until the gateway's bridge has subscribed on the cloud: until then the cloud drops
    commands sent to the site.
    """
    watcher = Client("127.0.0.1", stack.gateway.port, BRIDGE, pki.password(BRIDGE))
    assert watcher.connect() == 0
    for channel in ("results", "model/request"):
        watcher.subscribe(f"fleet/{FLEET}/+/{channel}")
    with cloud_client(stack, pki, "ota-probe") as cloud:
        assert cloud.connect() == 0
        wait_bridged(watcher, cloud, 20)
    return watcher


def bridge_config(tmp_path: Path, stack: Stack, pki: Pki, key_path: Path) -> BridgeConfig:
    ota = OtaConfig(signing_key=str(key_path), chunk_size=CHUNK, max_chunks_per_s=CHUNKS_PER_S)
    return cloud_bridge_config(tmp_path, stack.cloud.tls_port, pki, ota=ota)


# ---- edge nodes as processes -------------------------------------------------------------------


@dataclass
class EdgeProcess:
    """`edge-node run --config` for one device behind the gateway; SIGTERM drains and stops it."""

    device: str
    root: Path
    proc: ManagedProcess | None = None

    @property
    def state_dir(self) -> Path:
        return self.root / "ota"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox.sqlite"

    @property
    def log(self) -> Path:
        return self.root / "edge.log"

    def write_config(self, port: int, password: str, factory: Path, key: Ed25519PrivateKey) -> Path:
        return write_edge_config(
            self.root,
            port,
            factory,
            mqtt={"username": self.device, "password": password},
            device={"fleet_id": FLEET, "device_id": self.device},
            routing={"escalate": False},
            telemetry={"interval_s": 1.0},
            source={"kind": "replay", "rate_hz": RATE_HZ, "loop": True},
            ota={
                "state_dir": self.state_dir,
                "chunk_timeout_s": 0.5,
                "chunk_timeout_max_s": 2.0,
                "health_probation_s": 2.0,
                "probation_min_inferences": 30,
                "trusted_keys": {key_id_of(key): public_key_b64(key)},
            },
        )

    def start(self, stack: contextlib.ExitStack, config: Path) -> None:
        self.proc = stack.enter_context(run_edge_node(config, self.log, name=self.device))

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the node drains its outbox into the gateway), then the exit code."""
        assert self.proc is not None
        rc = self.proc.terminate(timeout)
        assert rc is not None and rc != -signal.SIGKILL, f"{self.device} did not stop within {timeout} s on SIGTERM"
        return rc

    def alive(self) -> None:
        assert self.proc is not None and self.proc.alive, f"{self.device} exited:\n{self.log_tail()}"

    def log_tail(self) -> str:
        assert self.proc is not None
        return self.proc.log_tail(30)

    def chunks_held(self, sha256: str, chunks: int) -> set[int]:
        """Chunks durably written so far (the staging bitmap is replaced atomically, so a read is whole)."""
        if (self.state_dir / "models" / f"{sha256}.onnx").exists():
            return set(range(chunks))
        try:
            body = json.loads((self.state_dir / "staging" / f"{sha256}.bitmap").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return set()
        have = base64.b64decode(body["have"])
        return {i for i in range(chunks) if have[i >> 3] & (1 << (i & 7))}

    def outbox_msg_ids(self) -> set[str]:
        """The messages left in the outbox that the cloud confirms (every one but the status)."""
        conn = sqlite3.connect(self.outbox)
        try:
            return {row[0] for row in conn.execute("SELECT msg_id FROM outbox WHERE seq IS NOT NULL")}
        finally:
            conn.close()


@contextlib.contextmanager
def edge_processes(
    tmp_path: Path, stack: Stack, pki: Pki, models: Models, key: Ed25519PrivateKey, devices: tuple[str, ...]
) -> Iterator[list[EdgeProcess]]:
    nodes = [EdgeProcess(device, tmp_path / device) for device in devices]
    with contextlib.ExitStack() as running:
        for node in nodes:
            node.start(running, node.write_config(stack.gateway.port, pki.password(node.device), models.base.path, key))
        yield nodes


# ---- observation -------------------------------------------------------------------------------


Messages = list[tuple[str, bytes]]


@functools.cache
def answers_in(topic: str, payload: bytes) -> tuple[Answered, ...]:
    """The answers of one results message, decoded once however often a predicate looks at it. The
    devices run current software: every results message is a result/2 (a micro-batch)."""
    message = decode_for_topic(TOPICS, topic, payload)
    assert isinstance(message, Results), f"{topic}: {type(message).__name__}, not result/2"
    return tuple(Answered.of(message))


def results_by_device(messages: Messages) -> dict[str, list[Answered]]:
    """Every answer the gateway accepted, per device, in inference order (duplicates kept)."""
    out: dict[str, list[Answered]] = {device: [] for device in DEVICES}
    for topic, payload in messages:
        if topic.endswith("/results"):
            for answer in answers_in(topic, payload):
                out[answer.device_id].append(answer)
    for got in out.values():
        got.sort(key=lambda r: seq(r)[1])
    return out


def requests_by_device(messages: Messages) -> Counter[str]:
    return Counter(topic.split("/")[2] for topic, _ in messages if topic.endswith("/model/request"))


def chunk_requests(messages: Messages, device: str) -> list[ModelChunkRequest]:
    """The chunk requests `device` published on the gateway, in order."""
    return [
        decode(payload, ModelChunkRequest)
        for topic, payload in messages
        if topic == TOPICS.device(FLEET, device, Channel.MODEL_REQUEST)
    ]


def answers_per_device(messages: Messages) -> Counter[str]:
    """Answers per device, repeats included. Cheap (each message decoded once, see `answers_in`): a
    predicate re-evaluated on every message the watcher receives."""
    counts: Counter[str] = Counter()
    for topic, payload in messages:
        if topic.endswith("/results"):
            counts[topic.split("/")[2]] += len(answers_in(topic, payload))
    return counts


def seq(result: Answered) -> tuple[str, int]:
    boot, _, n = result.inference_id.rpartition("-")
    return boot, int(n)


def model_runs(results: list[Answered]) -> list[ModelRef]:
    """The models in the order they answered, one entry per uninterrupted stretch."""
    runs: list[ModelRef] = []
    for r in results:
        if not runs or runs[-1] != r.model:
            runs.append(r.model)
    return runs


async def final_states(bridge: Bridge, cmd_ids: list[str], within_s: float) -> dict[str, CommandState]:
    found: dict[str, CommandState] = {}

    async def states() -> list[CommandState]:
        seen = await command_states(bridge.registry, cmd_ids=cmd_ids)
        found.update({s.cmd_id: s for s in seen})
        return seen

    def all_final(seen: list[CommandState]) -> bool:
        return len(seen) == len(cmd_ids) and all(s.final for s in seen)

    with contextlib.suppress(AssertionError):
        await wait_for_async(states, within_s, "final acks", until=all_final, interval=_POLL_S)
    return found


def chunk_sends(chunk_watcher: Client) -> Counter[int]:
    return Counter(decode(payload, ModelChunk).index for _, payload in chunk_watcher.received())


def assert_installed(node: EdgeProcess, new: ModelRef, data: bytes) -> None:
    """The verified artifact is in the device's content store and its active slot; no staging left."""
    stored = node.state_dir / "models" / f"{new.sha256}.onnx"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == new.sha256
    assert list((node.state_dir / "staging").glob("*")) == []
    state = json.loads((node.state_dir / "slots" / "state.json").read_text(encoding="utf-8"))
    assert state["active"] == "B", state
    assert (node.state_dir / "slots" / "B" / f"{new.sha256}.onnx").read_bytes() == data


def assert_inference_never_stopped(device: str, got: list[Answered], old: ModelRef, new: ModelRef) -> None:
    """One boot, every inference id from 1 up exactly once, at the source's steady rate, the factory
    model then the new one and never back (a batch never mixes them)."""
    ids = [r.inference_id for r in got]
    assert len(set(ids)) == len(ids), f"{device}: a result was published twice"
    assert len({seq(r)[0] for r in got}) == 1
    assert [seq(r)[1] for r in got] == list(range(1, len(got) + 1)), f"{device}: a gap in inference ids"
    assert model_runs(got) == [old, new], f"{device}: {model_runs(got)}"
    times = [r.ts for r in got]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < MAX_RESULT_GAP_S, f"{device}: inference paused {max(gaps):.2f} s"
    rate = (len(got) - 1) / (times[-1] - times[0])
    assert rate > 0.8 * RATE_HZ, f"{device}: {rate:.1f} results/s, the source replays {RATE_HZ}/s"


# ---- 1. a signed update through the gateway, cut mid-transfer ----------------------------------


async def test_signed_update_reaches_both_devices_through_the_gateway_across_a_cut(
    mosquitto_factory: MosquittoFactory,
    tcp_proxy: TcpProxyFactory,
    pki: Pki,
    models: Models,
    signing_key: tuple[Ed25519PrivateKey, Path],
    tmp_path: Path,
) -> None:
    stack = start_stack(mosquitto_factory, tcp_proxy, pki)
    watcher = gateway_watcher(stack, pki)
    # Every chunk the chunk server publishes, as the cloud broker sees it (whatever the link does).
    chunk_watcher = cloud_client(stack, pki, "ota-chunk-watcher")
    assert chunk_watcher.connect() == 0
    chunk_watcher.subscribe(TOPICS.model_chunks_filter(FLEET))
    old = ModelRef(name=models.base.name, version=models.base.version, sha256=models.base.sha256)
    try:
        async with running_bridge(bridge_config(tmp_path, stack, pki, signing_key[1])) as bridge:
            sender, server = bridge.commands, bridge.chunks
            assert sender is not None and server is not None
            record = await bridge.models.add(models.new.path)
            new = record.ref
            chunks = -(-record.size // CHUNK)
            assert new.version == "1.1.0" and new != old and chunks >= 8
            with edge_processes(tmp_path, stack, pki, models, signing_key[0], DEVICES) as nodes:
                # Both devices connected through the gateway and answering with the factory model.
                await asyncio.to_thread(
                    watcher.wait_for, lambda got: all(answers_per_device(got)[d] >= 40 for d in DEVICES), 40
                )
                commands = {d: await sender.send_update(FLEET, d, record) for d in DEVICES}

                def chunks_held() -> dict[str, int]:
                    for node in nodes:
                        node.alive()
                    return {n.device: len(n.chunks_held(new.sha256, chunks)) for n in nodes}

                await wait_for_async(
                    chunks_held,
                    30,
                    "the first 3 chunks on both devices",
                    until=lambda held: all(n >= 3 for n in held.values()),
                    interval=_POLL_S,
                )
                # The radio link dies: the gateway's bridge and the cloud keep their sessions open and
                # their bytes vanish, so nothing in flight is acknowledged either way.
                await asyncio.to_thread(stack.link.blackhole)
                held_at_cut = {n.device: n.chunks_held(new.sha256, chunks) for n in nodes}
                requests_at_cut = requests_by_device(watcher.received())

                def sent_and_asked() -> tuple[int, Counter[str]]:
                    return server.stats.chunks_sent, requests_by_device(watcher.received())

                def cut_long_enough(seen: tuple[int, Counter[str]]) -> bool:
                    # The chunk server sent the rest into the dead link, and each device, starved,
                    # has asked again (its re-requests queue on the gateway).
                    sent, asked = seen
                    return sent >= chunks and all(asked[d] > requests_at_cut[d] for d in DEVICES)

                await wait_for_async(
                    sent_and_asked,
                    30,
                    f"all chunks sent into the cut link and re-requests on the gateway (at the cut {requests_at_cut})",
                    until=cut_long_enough,
                    interval=_POLL_S,
                )
                held_at_restore = {n.device: n.chunks_held(new.sha256, chunks) for n in nodes}
                assert stack.link.stats().bytes_dropped > 0
                reconnects = stack.link.stats().connections_total
                await asyncio.to_thread(stack.link.restore)
                await asyncio.to_thread(stack.link.wait_until, lambda s: s.connections_total > reconnects, 40)

                states = await final_states(bridge, [c.cmd_id for c in commands.values()], 60)
                for node in nodes:
                    state = states.get(commands[node.device].cmd_id)
                    assert state is not None and state.state == "done", (node.device, state, node.log_tail())
                    assert state.model_version == new.version

                def new_results(got: Messages) -> bool:
                    return all(sum(r.model == new for r in mine) >= 40 for mine in results_by_device(got).values())

                await asyncio.to_thread(watcher.wait_for, new_results, 30)

                async def on_new_model() -> set[str]:
                    rows = await bridge.registry.rows(ResultRow)
                    return {r["device_id"] for r in rows if r["model_version"] == new.version}

                await wait_for_async(
                    on_new_model,
                    30,
                    "results of the new model from both devices in the registry",
                    until=lambda devices: devices == set(DEVICES),
                    interval=_POLL_S,
                )
                left: set[str] = set()
                for node in nodes:
                    assert node.stop() == 0, node.log_tail()
                    left |= node.outbox_msg_ids()

                # The node drained on stop; what its outbox still holds was sent and awaits the cloud's
                # confirmation (a confirm round is 10 s): every one of those is stored already.
                async def left_unstored() -> set[str]:
                    return left - {row["msg_id"] for row in await bridge.registry.rows(SeenMessage)}

                await wait_for_async(
                    left_unstored,
                    20,
                    f"the {len(left)} messages left in the outboxes stored by the bridge",
                    until=lambda missing: not missing,
                    interval=_POLL_S,
                )

                def backlog_seen_sent() -> tuple[int, int, int]:
                    return server.backlog, sum(chunk_sends(chunk_watcher).values()), server.stats.chunks_sent

                await wait_for_async(
                    backlog_seen_sent,
                    20,
                    "every chunk publish seen on the cloud broker (backlog, seen, sent)",
                    until=lambda s: s[0] == 0 and s[1] == s[2],
                    interval=_POLL_S,
                )
                sends = chunk_sends(chunk_watcher)
                chunk_stats = server.stats
    finally:
        chunk_watcher.close()
        watcher.close()

    # The cut really interrupted both downloads, and they resumed instead of starting over.
    for device in DEVICES:
        assert held_at_cut[device] <= held_at_restore[device], (held_at_cut, held_at_restore)
        assert len(held_at_restore[device]) < chunks, held_at_restore
        requests = chunk_requests(watcher.received(), device)
        assert requests[0].chunks == list(range(chunks))
        after_cut = requests[requests_at_cut[device] :]
        assert after_cut, f"{device} never asked again"
        for request in after_cut:
            assert not set(request.chunks) & held_at_cut[device], f"{device} asked again for a chunk it held"
    assert chunk_stats.requests > len(DEVICES), "the devices' re-requests from the cut reached the bridge"
    # The two devices share the per-model topic: every chunk went out, none more often than the bound.
    assert set(sends) == set(range(chunks))
    assert max(sends.values()) <= MAX_SENDS_PER_CHUNK, sends
    assert chunk_stats.bad_requests == chunk_stats.unknown_models == chunk_stats.publish_failures == 0
    data = models.new.path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == new.sha256 == record.sha256
    for node in nodes:
        assert_installed(node, new, data)
    for device, got in results_by_device(watcher.received()).items():
        assert_inference_never_stopped(device, got, old, new)


# ---- 2. a forged command through the same path -------------------------------------------------


async def test_forged_commands_through_the_gateway_are_rejected_and_a_genuine_one_obeyed(
    mosquitto_factory: MosquittoFactory,
    tcp_proxy: TcpProxyFactory,
    pki: Pki,
    models: Models,
    signing_key: tuple[Ed25519PrivateKey, Path],
    tmp_path: Path,
) -> None:
    device = DEVICES[0]
    trusted = signing_key[0]
    stack = start_stack(mosquitto_factory, tcp_proxy, pki)
    watcher = gateway_watcher(stack, pki)
    old = ModelRef(name=models.base.name, version=models.base.version, sha256=models.base.sha256)
    try:
        async with running_bridge(bridge_config(tmp_path, stack, pki, signing_key[1])) as bridge:
            sender, server = bridge.commands, bridge.chunks
            assert sender is not None and server is not None
            record = await bridge.models.add(models.new.path)
            mqtt = bridge.mqtt
            assert mqtt is not None

            async def publish(topic: str, payload: bytes, qos: int, expiry: int | None) -> None:
                await mqtt.publish(topic, payload, qos, message_expiry_s=expiry)

            attacker = generate_private_key()
            # Recorded in the registry like the bridge's own commands, so their acks join them there.
            unknown_key = CommandSender(TOPICS, attacker, None, publish, CHUNK, registry=bridge.registry)
            claims_trusted_id = CommandSender(
                TOPICS, attacker, key_id_of(trusted), publish, CHUNK, registry=bridge.registry
            )
            with edge_processes(tmp_path, stack, pki, models, trusted, (device,)) as (node,):
                await asyncio.to_thread(watcher.wait_for, lambda got: answers_per_device(got)[device] >= 20, 40)
                forged = {
                    "unknown_key": await unknown_key.send_update(FLEET, device, record),
                    "bad_signature": await claims_trusted_id.send_update(FLEET, device, record),
                }
                states = await final_states(bridge, [c.cmd_id for c in forged.values()], 30)
                node.alive()
                genuine = await sender.send_ping(FLEET, device)
                (ping,) = (await final_states(bridge, [genuine.cmd_id], 30)).values()
                node.alive()
                requested = requests_by_device(watcher.received())[device]
                assert node.stop() == 0, node.log_tail()
    finally:
        watcher.close()
    for code, command in forged.items():
        state = states.get(command.cmd_id)
        assert state is not None and state.state == "rejected", (code, state)
        assert state.reason is not None and state.reason.startswith(code), (code, state.reason)
    assert ping.state == "done", ping
    # Nothing of the forged updates was acted on: no chunk asked for, the factory model answered throughout.
    assert requested == 0 and server.stats.requests == 0
    assert {r.model for r in results_by_device(watcher.received())[device]} == {old}
