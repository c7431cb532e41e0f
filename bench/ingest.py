"""Ingestion throughput: a decode-only paho subscriber vs one bridge vs two bridges, in one run.

Everything runs against a private broker (`devservers.Mosquitto`, queue limits raised as docs/traps.md
trap 1 says, `max_inflight_messages 1000` as mosquitto/cloud.conf) and a private victoria-metrics
(the InfluxDB v2 write API):

1. The persistent sessions of every consumer are created first (the bare subscriber's, and each
   bridge's by running it once), then N realistic messages from several devices (results,
   telemetry windows with class counts and feature stats, 64-float samples, one status each) are
   published once with paho at QoS 1. The broker queues a copy for every session, so each consumer
   below drains the same backlog and nothing else competes with it for the CPU.
2. Each consumer runs in its own process (imports done before its clock starts):
   (a) bare paho subscriber that only decodes (`schemas.decode_for_topic`): the limit;
   (b) one bridge (`cloud_bridge.app.running_bridge`, influx url set, defaults otherwise: drift on
       if the bridge enables it by default) until every message is stored and acknowledged;
   (c) two bridges on the shared subscription, one shared SQLite registry (so dedup and drift see
       one fleet), until every message is stored; each status reaches both (it is not shared).
   A bridge run ends at its last registry commit (acks follow at once); the TSDB writer's lines
   are then flushed and checked (no failures, nothing pending).
   Each consumer's CPU time per message (its processes, all threads) is printed too: unlike the
   wall-clock rates it hardly depends on what else runs on the machine.
   Rounds (`--rounds`, default 3) repeat (a), (b), (c) on their own sessions and registries, so
   load from other processes on the machine hits each side alike; the ratios are per-round medians.
3. With `--profile FILE`, one more session is drained by one bridge under cProfile: the functions
   with the most own time, then the project's by cumulative time, are printed (not in the ratios).

The last line is the headline: `ratio X.XX bridge/bare` (target >= 0.5).

Run: `.venv/bin/python bench/ingest.py` (about a minute on an idle 2-vCPU machine, several when
other processes load it; `--messages` and `--rounds` change the size).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import logging
import pstats
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

# This checkout's packages, not the editable install's (a venv shared by several worktrees points
# at one of them): run from a worktree, the bench measures that worktree's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_bridge.app import Bridge, running_bridge
from cloud_bridge.config import load_config
from cloud_bridge.ingest.admission import ingest_filters
from cloud_bridge.ingest.ingestor import IngestStats
from devservers import Mosquitto, VictoriaMetrics
from schemas import (
    Answer,
    ConfidenceStats,
    EntropyStats,
    Envelope,
    EscalationCounts,
    FeatureStats,
    LatencyStats,
    ModelRef,
    OutboxStats,
    Results,
    Sample,
    SampleCounts,
    Status,
    Telemetry,
    TopK,
    decode_for_topic,
    encode,
    encode_tensor,
    new_msg_id,
)
from schemas.errors import DecodeError
from schemas.topics import Channel, Topics

log = logging.getLogger(__name__)

TOPICS = Topics("fleet")
FLEET = "bench"
MODEL = ModelRef(name="digits-edge", version="1.0.0", sha256="ab" * 32)
LABELS = [str(i) for i in range(10)]
WAIT_S = 120.0  # bound on every wait; a stuck run fails instead of hanging
POLL_S = 0.01  # the parent polls the registry's row count this often (bridges expose no cross-process event)
PUBLISH_WINDOW = 1000
SESSION_EXPIRY_S = 3600
BROKER_INFLIGHT = 1000  # as mosquitto/cloud.conf


# ---- the messages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mix:
    """Messages per cycle of each kind, per device (default: 17 results, 2 telemetry, 1 sample)."""

    results: int = 17
    telemetry: int = 2
    samples: int = 1

    @classmethod
    def parse(cls, text: str) -> Mix:
        try:
            r, t, s = (int(p) for p in text.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--mix {text!r}: use RESULTS:TELEMETRY:SAMPLES, e.g. 17:2:1") from None
        return cls(r, t, s)


def _status(device: str, now: float) -> Status:
    return Status(
        msg_id=new_msg_id(), fleet_id=FLEET, device_id=device, ts=now, state="online", reason="connected", model=MODEL
    )


def _results(device: str, i: int, answers: int, now: float, rng: np.random.Generator) -> Results:
    """A result/2 message, as devices send one per micro-batch, with `answers` answers."""
    labels = [LABELS[int(k)] for k in rng.integers(10, size=answers)]
    return Results(
        msg_id=new_msg_id(),
        fleet_id=FLEET,
        device_id=device,
        ts=now,
        model=MODEL,
        answers=[
            Answer(
                inference_id=f"{device}-{i}-{j}",
                label=label,
                index=int(label),
                confidence=float(rng.uniform(0.5, 1.0)),
                path="edge",
                edge_label=label,
                latency_ms=float(rng.uniform(0.05, 2.0)),
                source_ref=f"replay:{i}",
                truth=label,
            )
            for j, label in enumerate(labels)
        ],
    )


@dataclass(frozen=True)
class DeviceProfile:
    """A stationary device: its inputs' per-feature mean and std barely move from window to window,
    and its class mix is the reference one, so drift scoring runs on every window but stays quiet."""

    mean: npt.NDArray[np.float64]
    std: npt.NDArray[np.float64]

    @classmethod
    def random(cls, rng: np.random.Generator) -> DeviceProfile:
        return cls(mean=rng.uniform(0, 16, 64), std=rng.uniform(1, 6, 64))


def _telemetry(device: str, seq: int, start: float, profile: DeviceProfile, rng: np.random.Generator) -> Telemetry:
    counts = rng.multinomial(200, [0.1] * 10)
    end = start + 10.0 * seq
    return Telemetry(
        msg_id=new_msg_id(),
        fleet_id=FLEET,
        device_id=device,
        ts=end,
        model=MODEL,
        window_start=end - 10.0,
        window_end=end,
        window_seq=seq,
        count=200,
        latency_ms=LatencyStats(p50=0.1, p95=0.3, p99=0.5, max=1.2, mean=0.15),
        confidence=ConfidenceStats(mean=0.93, p05=0.61, min=0.31),
        entropy=EntropyStats(mean=0.2, p95=0.9, max=1.4),
        class_counts={LABELS[k]: int(c) for k, c in enumerate(counts) if c},
        paths={"edge": 190, "cloud": 8, "edge_fallback": 2},
        escalations=EscalationCounts(sent=10, answered=8, timed_out=2, agreed=6),
        samples=SampleCounts(sent=3, skipped_budget=1),
        outbox=OutboxStats(depth=5, bytes=1000),
        features=FeatureStats(
            n=200,
            dims=64,
            mean=[float(v) for v in profile.mean + rng.normal(0, 0.02, 64)],
            std=[float(v) for v in profile.std + rng.normal(0, 0.02, 64)],
        ),
    )


def _sample(device: str, i: int, now: float, rng: np.random.Generator) -> Sample:
    top = rng.choice(10, 2, replace=False)
    return Sample(
        msg_id=new_msg_id(),
        fleet_id=FLEET,
        device_id=device,
        ts=now,
        model=MODEL,
        inference_id=f"{device}-{i}",
        input=encode_tensor(rng.uniform(0, 16, 64).astype(np.float32)),
        predicted=LABELS[int(top[0])],
        topk=[
            TopK(label=LABELS[int(top[0])], index=int(top[0]), prob=0.5),
            TopK(label=LABELS[int(top[1])], index=int(top[1]), prob=0.4),
        ],
        entropy=1.2,
        margin=0.1,
        reasons=["entropy", "margin"],
        source_ref=f"replay:{i}",
    )


def build_messages(
    n: int, devices: int, mix: Mix, max_answers: int = 4, seed: int = 7
) -> list[tuple[str, bytes, str, int]]:
    """One status per device, then `n` messages cycling over devices and kinds: (topic, payload,
    kind, registry rows it makes). A results message carries 1 to `max_answers` answers."""
    rng = np.random.default_rng(seed)
    now = time.time()
    names = [f"dev-{d:03d}" for d in range(devices)]
    out: list[tuple[str, bytes, str, int]] = []
    for name in names:
        out.append((TOPICS.device(FLEET, name, Channel.STATUS), encode(_status(name, now)), "status", 0))
    cycle = ["results"] * mix.results + ["telemetry"] * mix.telemetry + ["samples"] * mix.samples
    seqs = dict.fromkeys(names, 0)
    profiles = {name: DeviceProfile.random(rng) for name in names}
    start = now - 10.0 * (n // devices + 1)
    for i in range(n):
        name = names[i % devices]
        kind = cycle[(i // devices) % len(cycle)]
        message: Envelope
        rows = 1
        if kind == "results":
            rows = int(rng.integers(1, max_answers + 1))
            message, channel = _results(name, i, rows, now, rng), Channel.RESULTS
        elif kind == "telemetry":
            seqs[name] += 1
            message, channel = _telemetry(name, seqs[name], start, profiles[name], rng), Channel.TELEMETRY
        else:
            message, channel = _sample(name, i, now, rng), Channel.SAMPLES
        out.append((TOPICS.device(FLEET, name, channel), encode(message), kind, rows))
    return out


# ---- broker sessions and publishing --------------------------------------------------------------


def _v5_client(client_id: str) -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)


def _persistent(client: mqtt.Client, host: str, port: int) -> None:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = SESSION_EXPIRY_S
    client.connect(host, port, keepalive=30, clean_start=False, properties=props)


def create_bare_session(host: str, port: int, client_id: str) -> None:
    """Subscribe once with a persistent session, then leave: the broker queues from now on."""
    subscribed = threading.Event()
    client = _v5_client(client_id)
    client.on_subscribe = lambda *_: subscribed.set()
    _persistent(client, host, port)
    client.loop_start()
    try:
        client.subscribe([(f, 1) for f in ingest_filters(TOPICS, "unused", shared=False)])
        if not subscribed.wait(WAIT_S):
            raise RuntimeError(f"{client_id}: no SUBACK within {WAIT_S} s")
    finally:
        client.disconnect()
        client.loop_stop()


def publish(host: str, port: int, messages: Sequence[tuple[str, bytes, str, int]]) -> float:
    """Publish everything at QoS 1 with a window in flight; returns seconds until the last PUBACK."""
    acked = 0
    failed = 0
    done = threading.Event()

    def on_publish(client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Properties | None) -> None:
        nonlocal acked, failed
        acked += 1
        failed += bool(reason.is_failure)
        if acked >= len(messages):
            done.set()

    client = _v5_client("bench-publisher")
    client.max_inflight_messages_set(PUBLISH_WINDOW)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect(host, port, keepalive=30)
    client.loop_start()
    start = time.perf_counter()
    try:
        for topic, payload, *_ in messages:
            info = client.publish(topic, payload, qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"paho refused a publish: rc={info.rc}")
        if not done.wait(WAIT_S):
            raise RuntimeError(f"publisher: only {acked}/{len(messages)} PUBACKs within {WAIT_S} s")
    finally:
        client.disconnect()
        client.loop_stop()
    if failed:
        raise RuntimeError(f"broker rejected {failed} publishes")
    return time.perf_counter() - start


# ---- bridge configs --------------------------------------------------------------------------------


def write_bridge_config(
    path: Path, *, state: Path, registry: Path, broker: Mosquitto, influx: str, client_id: str, group: str
) -> Path:
    path.write_text(
        f"""state_dir = "{state}"
status_interval_s = 3600

[mqtt]
host = "{broker.host}"
port = {broker.port}
client_id = "{client_id}"
session_expiry_s = {SESSION_EXPIRY_S}

[fleet]
share_group = "{group}"

[registry]
url = "sqlite+aiosqlite:///{registry}"

[influx]
url = "{influx}"
""",
        encoding="utf-8",
    )
    return path


async def create_bridge_session(config_path: Path) -> None:
    """Run the bridge once so the broker holds its session and subscriptions (and the registry exists)."""
    async with running_bridge(load_config(config_path)):
        pass


def stored(registry: Path) -> int:
    """Rows of the benchmark's own messages (not seen_messages: the bridge also ingests its own alerts)."""
    with sqlite3.connect(f"file:{registry}?mode=ro", uri=True, timeout=5) as conn:
        (count,) = conn.execute(
            "SELECT (SELECT count(*) FROM results) + (SELECT count(*) FROM telemetry) + (SELECT count(*) FROM samples)"
        ).fetchone()
        return int(count)


# ---- child processes -------------------------------------------------------------------------------


def child_bare(host: str, port: int, client_id: str, expect: int) -> dict[str, Any]:
    """Drain the persistent session, decoding every message; report the time of the last one."""
    received = 0
    errors = 0
    last = 0.0
    last_cpu = 0.0
    done = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        nonlocal received, errors, last, last_cpu
        try:
            decode_for_topic(TOPICS, msg.topic, msg.payload)
        except DecodeError:  # counted: the bench fails if any message did not decode
            errors += 1
        received += 1
        if received >= expect:
            last, last_cpu = time.time(), time.process_time()
            done.set()

    client = _v5_client(client_id)
    client.on_message = on_message
    start, start_cpu = time.time(), time.process_time()
    _persistent(client, host, port)
    client.loop_start()
    try:
        if not done.wait(WAIT_S):
            raise RuntimeError(f"bare subscriber: {received}/{expect} messages within {WAIT_S} s")
    finally:
        client.disconnect()
        client.loop_stop()
    return {"start": start, "end": last, "cpu": last_cpu - start_cpu, "received": received, "errors": errors}


async def child_bridge(config_path: Path, profile: Path | None) -> dict[str, Any]:
    """Run one bridge until the parent says stop (a line on stdin); report its last commit's time.

    The parent says stop once the rows are visible in the registry, which can be before this
    process has resumed after that commit: leaving `running_bridge` drains the ingestor (and
    flushes the TSDB writer), so the counters and the commit clock read afterwards are final.
    """
    config = load_config(config_path)
    profiler = cProfile.Profile() if profile is not None else None
    start, start_cpu = time.time(), time.process_time()
    if profiler is not None:
        profiler.enable()
    async with running_bridge(config) as bridge:
        commits = CommitClock(bridge, start, start_cpu)
        tracker = asyncio.create_task(commits.track())
        await asyncio.to_thread(sys.stdin.readline)
    if profiler is not None:
        profiler.disable()
        if profile is not None:
            profiler.dump_stats(profile)
    tracker.cancel()
    assert bridge.tsdb is not None and bridge.ingestor is not None
    stats = bridge.ingestor.stats
    return {
        "start": start,
        "end": commits.last,
        "cpu": commits.last_cpu - start_cpu,
        "received": stats.received,
        "stored": stats.stored,
        "duplicates": stats.duplicates,
        "dead_letters": stats.dead_letters,
        "batches": stats.batches,
        "tsdb_flushed": bridge.tsdb.pending == 0,
        "tsdb_written": bridge.tsdb.written,
        "tsdb_failures": bridge.tsdb.failures,
        "drift": getattr(bridge, "drift", None) is not None,
    }


class CommitClock:
    """The wall and process CPU time (all threads) of the bridge's last batch commit."""

    def __init__(self, bridge: Bridge, start: float, start_cpu: float) -> None:
        assert bridge.ingestor is not None
        self.ingestor = bridge.ingestor
        self.last = start
        self.last_cpu = start_cpu

    def _handled(self) -> int:
        s = self.ingestor.stats
        return s.stored + s.duplicates + s.dead_letters

    async def track(self) -> None:
        while True:
            await self.ingestor.wait_for(self._moved_on(self._handled()))
            self.last, self.last_cpu = time.time(), time.process_time()

    def _moved_on(self, seen: int) -> Callable[[IngestStats], bool]:
        return lambda _: self._handled() > seen


# ---- the parent ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    """`messages` in `seconds` of wall time, using `cpu_s` of consumer CPU (all its processes and threads)."""

    name: str
    messages: int
    seconds: float
    cpu_s: float

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.messages * 1e6

    @property
    def per_s(self) -> float:
        return self.messages / self.seconds


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _child_result(proc: subprocess.Popen[str], stop: bool) -> dict[str, Any]:
    out, _ = proc.communicate("stop\n" if stop else None, timeout=WAIT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"child {proc.args!r} exited with {proc.returncode}")
    return dict(json.loads(out.strip().splitlines()[-1]))


def run_bare(broker: Mosquitto, client_id: str, expect: int) -> Rate:
    proc = _spawn(["--child-bare", broker.host, str(broker.port), client_id, str(expect)])
    res = _child_result(proc, stop=False)
    if res["errors"]:
        raise RuntimeError(f"bare subscriber: {res['errors']} messages did not decode")
    return Rate("bare paho, decode only", expect, res["end"] - res["start"], res["cpu"])


def run_bridges(
    name: str, configs: list[Path], registry: Path, total: int, expect: int, profile: Path | None = None
) -> Rate:
    """Run bridges until `expect` result/telemetry/sample rows are stored; rate over `total` messages."""
    procs = [_spawn(["--child-bridge", str(c), *(["--profile-out", str(profile)] if profile else [])]) for c in configs]
    try:
        deadline = time.monotonic() + WAIT_S
        while stored(registry) < expect:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"{name}: a bridge exited early")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: {stored(registry)}/{expect} stored within {WAIT_S} s")
            time.sleep(POLL_S)
        results = [_child_result(p, stop=True) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for res in results:
        if res["dead_letters"] or res["tsdb_failures"] or not res["tsdb_flushed"]:
            raise RuntimeError(f"{name}: unexpected outcome {res}")
    print(
        f"  {name}: per bridge stored={[r['stored'] for r in results]} dups={[r['duplicates'] for r in results]} "
        f"batches={[r['batches'] for r in results]} tsdb_lines={[r['tsdb_written'] for r in results]} "
        f"drift={'on' if results[0]['drift'] else 'off'}",
        flush=True,
    )
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return Rate(name, total, wall, sum(r["cpu"] for r in results))


def print_profile(path: Path, top: int = 25) -> None:
    """The functions with the most own time, then the project's functions by cumulative time."""
    for title, key, restriction in (
        ("own time", "tottime", ""),
        ("cumulative time, project code", "cumulative", "(cloud_bridge|schemas)/"),
    ):
        buf = io.StringIO()
        stats = pstats.Stats(str(path), stream=buf)
        stats.sort_stats(key).print_stats(restriction, top) if restriction else stats.sort_stats(key).print_stats(top)
        print(f"\n--- profile of one bridge: {title} (full stats in {path}) ---")
        lines = buf.getvalue().splitlines()
        start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("ncalls")), 0)
        print("\n".join(ln.replace(str(Path.cwd()) + "/", "") for ln in lines[start : start + top + 1]))


@dataclass(frozen=True)
class Round:
    """The sessions of one round: a bare subscriber, one bridge, two bridges (each its own registry)."""

    bare: str
    one: list[Path]
    one_db: Path
    two: list[Path]
    two_db: Path


@dataclass(frozen=True)
class RoundRates:
    bare: Rate
    single: Rate
    double: Rate


def make_rounds(work: Path, broker: Mosquitto, influx: str, rounds: int) -> list[Round]:
    def cfg(name: str, db: Path, group: str) -> Path:
        return write_bridge_config(
            work / f"{name}.toml",
            state=work / name,
            registry=db,
            broker=broker,
            influx=influx,
            client_id=name,
            group=group,
        )

    made = []
    for r in range(rounds):
        one_db, two_db = work / f"one-{r}.db", work / f"two-{r}.db"
        made.append(
            Round(
                bare=f"bench-bare-{r}",
                one=[cfg(f"bridge-one-{r}", one_db, f"one{r}")],
                one_db=one_db,
                two=[cfg(f"bridge-two-{r}a", two_db, f"two{r}"), cfg(f"bridge-two-{r}b", two_db, f"two{r}")],
                two_db=two_db,
            )
        )
    return made


def run_round(broker: Mosquitto, rnd: Round, total: int, rows: int) -> RoundRates:
    return RoundRates(
        bare=run_bare(broker, rnd.bare, total),
        single=run_bridges("one bridge", rnd.one, rnd.one_db, total, rows),
        double=run_bridges("two bridges, shared subscription", rnd.two, rnd.two_db, total, rows),
    )


def main_parent(args: argparse.Namespace) -> None:
    messages = build_messages(args.messages, args.devices, args.mix, args.answers)
    total = len(messages)
    kinds: dict[str, int] = {}
    for _, _, kind, _ in messages:
        kinds[kind] = kinds.get(kind, 0) + 1
    mean_size = sum(len(p) for _, p, _, _ in messages) / total
    answers = sum(rows for _, _, kind, rows in messages if kind == "results")
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        with (
            Mosquitto(work / "broker", max_inflight_messages=BROKER_INFLIGHT) as broker,
            VictoriaMetrics(work / "vm") as vm,
        ):
            rounds = make_rounds(work, broker, vm.url, args.rounds)
            prof_db = work / "prof.db"
            prof = []
            if args.profile is not None:
                prof = [
                    write_bridge_config(
                        work / "prof.toml",
                        state=work / "prof",
                        registry=prof_db,
                        broker=broker,
                        influx=vm.url,
                        client_id="bridge-prof",
                        group="prof",
                    )
                ]
            for rnd in rounds:
                create_bare_session(broker.host, broker.port, rnd.bare)
            for c in [c for rnd in rounds for c in rnd.one + rnd.two] + prof:
                asyncio.run(create_bridge_session(c))
            seconds = publish(broker.host, broker.port, messages)
            mix = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
            print(
                f"{total} messages from {args.devices} devices ({mix}; {answers} answers in the results"
                f" messages), mean payload {mean_size:.0f} B; "
                f"published at QoS 1 in {seconds:.1f} s, queued for {4 * len(rounds) + len(prof)} sessions; "
                f"{len(rounds)} round(s) of: bare, one bridge, two bridges",
                flush=True,
            )
            rows = sum(rows for *_, rows in messages)
            results = [run_round(broker, rnd, total, rows) for rnd in rounds]
            profiled = (
                run_bridges("one bridge under cProfile", prof, prof_db, total, rows, args.profile.resolve())
                if prof
                else None
            )
            if broker.dropped_messages_logged():
                raise RuntimeError(f"broker dropped queued messages (docs/traps.md #1): see {broker.log_path}")
            if profiled is not None and args.profile is not None:
                print_profile(args.profile)
    for i, res in enumerate(results):
        for rate in (res.bare, res.single, res.double):
            print(
                f"round {i + 1}: {rate.name:<34} {rate.messages:>7} msgs in {rate.seconds:6.2f} s "
                f"= {rate.per_s:8.0f} msgs/s, {rate.cpu_us:5.0f} us CPU/msg"
            )
    if profiled is not None:
        print(f"{profiled.name:<43} {profiled.messages:>7} msgs in {profiled.seconds:6.2f} s (not in the ratios)")
    scaling = statistics.median(r.double.per_s / r.single.per_s for r in results)
    headline = statistics.median(r.single.per_s / r.bare.per_s for r in results)
    # CPU per message barely moves when other processes compete for the cores; wall time does.
    cpu_ratio = statistics.median(r.bare.cpu_us / r.single.cpu_us for r in results)
    extra = statistics.median(r.single.cpu_us - r.bare.cpu_us for r in results)
    print(f"CPU per message, bare/bridge {cpu_ratio:.2f} (the bridge spends {extra:.0f} us more per message)")
    print(f"ratio two-bridges/one-bridge {scaling:.2f} (median of {len(results)} round(s))")
    print(f"ratio {headline:.2f} bridge/bare")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10_000, help="messages to publish (plus one status per device)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of (bare, one bridge, two bridges); the ratios are medians"
    )
    parser.add_argument("--devices", type=int, default=20, help="devices the messages come from")
    parser.add_argument("--mix", type=Mix.parse, default=Mix(), help="RESULTS:TELEMETRY:SAMPLES per cycle (17:2:1)")
    parser.add_argument(
        "--answers",
        type=int,
        default=4,
        help="a results message (result/2, one per micro-batch) carries 1 to this many answers (default 4)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="FILE",
        help="also drain one bridge under cProfile, print its hot spots and keep the stats in FILE",
    )
    parser.add_argument(
        "--child-bare", nargs=4, metavar=("HOST", "PORT", "CLIENT_ID", "EXPECT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--child-bridge", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.child_bare:
        host, port, client_id, expect = args.child_bare
        print(json.dumps(child_bare(host, int(port), client_id, int(expect))))
    elif args.child_bridge:
        print(json.dumps(asyncio.run(child_bridge(args.child_bridge, args.profile_out))))
    else:
        main_parent(args)


if __name__ == "__main__":
    main()
