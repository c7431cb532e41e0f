"""The bridge's CPU per message on the fleet's own mix, against a decode-only subscriber, and
optionally against another checkout of the code (before/after, side by side in one run).

bench/ingest.py measures throughput on a mix of its own (JSON, 20 devices, 1-4 answers per result);
this bench measures what docs/scaling.md sizes bridges by: CPU µs per message handled on what the
fleet simulator (fleetsim/device.py) sends at the issue's profile, built with its own
`Device` class in the compact encoding. One "fleet second" of `--devices` devices is 10 s of their
traffic: a status each (with its outbox epoch: the bridge confirms), one result/2 of ~10 answers,
one telemetry window, 5% of ten inferences escalated (the cloud model answers, the reply goes to
the device's topic, the request's deadline far ahead so none expires) and the samples within the
edge's budget.

Everything is published once, at QoS 1, to a private broker that queues a copy for every consumer's
persistent session; each consumer then drains its own copy in its own process:

  bare       paho + `schemas.decode_for_topic` per message, nothing else: the floor;
  bridge     `cloud-bridge run`'s `Bridge` (SQLite registry, drift on, the demo cloud model, no TSDB,
             as bench/fleet.py runs it) until every message is stored or answered and a last
             confirmation flush is published;
  baseline   (with `--baseline TREE`) the same bridge from another checkout (e.g. /work/main), its
             child started with TREE first on sys.path.

Rounds repeat the consumers in turn, so load from other processes hits each alike. CPU is the
consumer process's (all threads) from before it connects to its last message handled; imports are
done first. Printed per round, then medians; the last line is the headline:
`ratio X.XX bridge-cpu/baseline-cpu` with --baseline, else `bridge X us/msg`.

Run: `.venv/bin/python bench/bridge_cpu.py --devices 2000 --rounds 3 --baseline /work/main`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if "--child-bridge" not in sys.argv:
    sys.path[:0] = [str(ROOT)]

WAIT_S = 300.0
SESSION_EXPIRY_S = 3600
BROKER_INFLIGHT = 1000  # as mosquitto/cloud.conf
PREFIX = "fleet"
FLEET = "sim"


# ---- the messages ---------------------------------------------------------------------------------


def build_messages(devices: int, seed: int = 1) -> list[tuple[str, bytes, str]]:
    """(topic, payload, kind) of 10 s of the fleet's traffic at 1 Hz, 5% escalations, samples within
    the edge's budget, built by the fleet simulator (fleetsim): statuses first."""
    import numpy as np

    from fleetsim.device import Device, Population
    from fleetsim.profile import Profile
    from fleetsim.wire import float32
    from schemas.topics import Channel, Topics

    rng = np.random.default_rng(seed)
    topics = Topics(PREFIX)
    now = time.time()
    profile = Profile()
    population = Population(devices, profile, rng, now - 10.0)
    fleet = [Device(topics, FLEET, f"sim-{i:06d}", i, "be0c4") for i in range(devices)]
    out = [(d.topic[Channel.STATUS], d.status(now, True, False), "status") for d in fleet]
    rows = np.arange(devices)
    for second in range(10):  # 10 s at 1 Hz
        labels = rng.integers(10, size=devices).tolist()
        inputs = population.inputs(rows, rng)
        for d, label, data in zip(fleet, labels, inputs, strict=True):
            number = second + 1
            population.classes[d.index, label] += 1
            if rng.random() < 0.05:
                request = d.escalation(now, number, label, 0.5, data, 86_400.0)
                out.append((d.topic[Channel.ESCALATE], request, "escalate"))
                population.escalations[d.index, :2] += 1
                population.paths[d.index, 1] += 1
                d.pending.append((number, label, label, label, "cloud", None, float32(0.5), float32(30.0)))
                if d.take_sample(now, profile.samples_per_minute):
                    out.append((d.topic[Channel.SAMPLES], d.sample(now, number, label, 0.5, data, False), "sample"))
                    population.samples[d.index] += 1
            else:
                population.paths[d.index, 0] += 1
                confidence = float32(0.8 + 0.2 * float(rng.random()))
                d.pending.append((number, label, label, -1, "edge", None, confidence, float32(0.3)))
    for d, (counts, mean, std) in zip(fleet, population.close_windows(rows, now, rng), strict=True):
        out.append((d.topic[Channel.RESULTS], d.results(now, 256, False), "results"))
        out.append((d.topic[Channel.TELEMETRY], d.telemetry(now, counts, mean, std, False), "telemetry"))
    return out


def filters() -> list[str]:
    from cloud_bridge.escalation.escalator import escalation_filter
    from cloud_bridge.ingest.admission import ingest_filters
    from schemas.topics import Topics

    topics = Topics(PREFIX)
    return [*ingest_filters(topics, "unused", shared=False), escalation_filter(topics, "unused", shared=False)]


# ---- consumers (child processes) -------------------------------------------------------------------


def child_bare(host: str, port: int, client_id: str, expect: int, subscribe: bool) -> dict[str, Any]:
    """Subscribe once (`subscribe`), or drain the session decoding every message."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from schemas.codec import decode_for_topic
    from schemas.errors import DecodeError
    from schemas.topics import Topics

    topics = Topics(PREFIX)
    received = errors = 0
    last_cpu = 0.0
    done = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        nonlocal received, errors, last_cpu
        try:
            decode_for_topic(topics, msg.topic, msg.payload)
        except DecodeError:  # counted: the bench fails if any message did not decode
            errors += 1
        received += 1
        if received >= expect:
            last_cpu = time.process_time()
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *_: done.set()
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = SESSION_EXPIRY_S
    start_cpu = time.process_time()
    client.connect(host, port, keepalive=30, clean_start=False, properties=props)
    client.loop_start()
    try:
        if subscribe:
            client.subscribe([(f, 1) for f in filters()])
        if not done.wait(WAIT_S):
            raise RuntimeError(f"bare subscriber: {received}/{expect} messages within {WAIT_S} s")
    finally:
        client.disconnect()
        client.loop_stop()
    return {"cpu": last_cpu - start_cpu, "received": received, "errors": errors}


async def child_bridge(config_path: Path, ingest: int, escalations: int) -> dict[str, Any]:
    """Run one bridge until `ingest` messages are handled and `escalations` answered, then flush the
    confirmations; report the CPU used up to there."""
    from cloud_bridge.app import running_bridge
    from cloud_bridge.config import load_config

    config = load_config(config_path)
    start_cpu = time.process_time()
    async with running_bridge(config) as bridge:
        if ingest == 0:
            return {"cpu": 0.0}
        assert bridge.ingestor is not None and bridge.escalator is not None and bridge.confirmer is not None
        deadline = time.monotonic() + WAIT_S
        ing, esc = bridge.ingestor.stats, bridge.escalator.stats
        while ing.stored + ing.duplicates + ing.dead_letters < ingest or esc.answered + esc.expired < escalations:
            if time.monotonic() > deadline:
                raise RuntimeError(f"bridge: ingest {ing} escalations {esc} within {WAIT_S} s")
            await asyncio.sleep(0.005)
        await bridge.confirmer.flush()
        cpu = time.process_time() - start_cpu
        return {
            "cpu": cpu,
            "stored": ing.stored,
            "dups": ing.duplicates,
            "dead_letters": ing.dead_letters,
            "answered": esc.answered,
            "expired": esc.expired,
            "batches": ing.batches,
            "confirms": bridge.confirmer.stats.messages,
        }


# ---- the parent -------------------------------------------------------------------------------------


def write_config(path: Path, work: Path, name: str, port: int, model: Path) -> Path:
    path.write_text(
        f"""state_dir = "{work / name}"
status_interval_s = 3600

[mqtt]
host = "127.0.0.1"
port = {port}
client_id = "{name}"
session_expiry_s = {SESSION_EXPIRY_S}

[fleet]
share_group = "{name}"

[registry]
url = "sqlite+aiosqlite:///{work / name}.db"

[escalation]
model = "{model}"
max_batch = 64

[drift]
baseline_windows = 5
min_samples = 50
""",
        encoding="utf-8",
    )
    return path


def spawn(args: list[str], tree: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, env=env, cwd=tree)


def result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=WAIT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"child {proc.args!r} exited with {proc.returncode}")
    return dict(json.loads(out.strip().splitlines()[-1]))


@dataclass(frozen=True)
class Consumer:
    name: str
    tree: Path
    config: Path | None  # None: the bare subscriber

    def run(self, port: int, ingest: int, escalations: int, subscribe: bool = False) -> dict[str, Any]:
        if self.config is None:
            total = 0 if subscribe else ingest + escalations
            args = ["--child-bare", str(port), self.name, str(total), str(int(subscribe))]
        else:
            n = (0, 0) if subscribe else (ingest, escalations)
            args = ["--child-bridge", str(self.config), str(n[0]), str(n[1])]
        return result(spawn(args, self.tree))


def publish(port: int, messages: list[tuple[str, bytes, str]]) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    acked = 0
    done = threading.Event()

    def on_publish(*_: Any) -> None:
        nonlocal acked
        acked += 1
        if acked >= len(messages):
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-publisher", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        for topic, payload, kind in messages:
            client.publish(topic, payload, qos=1, retain=kind == "status")
        if not done.wait(WAIT_S):
            raise RuntimeError(f"publisher: {acked}/{len(messages)} PUBACKs within {WAIT_S} s")
    finally:
        client.disconnect()
        client.loop_stop()


def main_parent(args: argparse.Namespace) -> None:
    from benchkit.servers import cloud_model
    from devservers import Mosquitto

    messages = build_messages(args.devices)
    kinds: dict[str, int] = {}
    for _, _, kind in messages:
        kinds[kind] = kinds.get(kind, 0) + 1
    escalations = kinds.get("escalate", 0)
    ingest = len(messages) - escalations
    trees = [("bridge", ROOT)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    with tempfile.TemporaryDirectory(prefix="bench-bridge-cpu-") as tmp:
        work = Path(tmp)
        model = cloud_model(args.models or work)
        with Mosquitto(work / "broker", max_inflight_messages=BROKER_INFLIGHT, autosave_interval_s=10) as broker:
            rounds: list[list[Consumer]] = []
            for r in range(args.rounds):
                consumers = [Consumer(f"bare-{r}", ROOT, None)]
                for name, tree in trees:
                    cid = f"{name}-{r}"
                    config = write_config(work / f"{cid}.toml", work, cid, broker.port, model)
                    consumers.append(Consumer(cid, tree, config))
                rounds.append(consumers)
            for c in [c for rnd in rounds for c in rnd]:
                c.run(broker.port, ingest, escalations, subscribe=True)
            publish(broker.port, messages)
            mix = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
            size = sum(len(p) for _, p, _ in messages) / len(messages)
            print(f"{len(messages)} messages of {args.devices} devices' 10 s ({mix}), mean {size:.0f} B", flush=True)
            per: dict[str, list[float]] = {}
            for r, consumers in enumerate(rounds):
                order = consumers if r % 2 == 0 else [consumers[0], *reversed(consumers[1:])]
                for c in order:
                    res = c.run(broker.port, ingest, escalations)
                    us = res["cpu"] / len(messages) * 1e6
                    kind = c.name.rsplit("-", 1)[0]
                    per.setdefault(kind, []).append(us)
                    extra = {k: v for k, v in res.items() if k != "cpu"}
                    print(f"round {r + 1}: {kind:<9} {us:6.0f} us CPU/msg {extra}", flush=True)
            if broker.dropped_messages_logged():
                raise RuntimeError(f"broker dropped queued messages (docs/traps.md #1): see {broker.log_path}")
    medians = {k: statistics.median(v) for k, v in per.items()}
    for kind, us in medians.items():
        print(f"median {kind:<9} {us:6.0f} us CPU/msg over {len(per[kind])} round(s)")
    if "baseline" in medians:
        ratios = [b / a for a, b in zip(per["baseline"], per["bridge"], strict=True)]
        print(f"ratio {statistics.median(ratios):.2f} bridge-cpu/baseline-cpu")
    else:
        print(f"bridge {medians['bridge']:.0f} us/msg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2000, help="devices of the fleet (10 s of their traffic)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, default=None, metavar="TREE", help="another checkout to compare")
    parser.add_argument("--models", type=Path, default=None, help="where to build/cache the demo cloud model")
    parser.add_argument("--child-bare", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--child-bridge", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_bare:
        port, cid, expect, subscribe = args.child_bare
        print(json.dumps(child_bare("127.0.0.1", int(port), cid, int(expect), subscribe == "1")))
    elif args.child_bridge:
        import logging

        logging.basicConfig(level=logging.WARNING)
        config, ingest, escalations = args.child_bridge
        print(json.dumps(asyncio.run(child_bridge(Path(config), int(ingest), int(escalations)))))
    else:
        main_parent(args)


if __name__ == "__main__":
    main()
