"""Durable outbox + link vs bare paho-mqtt QoS 1, side by side in one run, through one broker.

Measured against a private mosquitto (`devservers.Mosquitto`, queue limits raised, docs/traps.md #1):

1. bare paho-mqtt 2.x: one client publishes N QoS 1 messages (same in-flight window as the link,
   MQTT 5 like the link) and the time runs until the last PUBACK. No subscriber: QoS 1 covers the
   publisher->broker hop, which is what both sides are limited by.
2. the durable path, `edge_node.uplink.outbox.Outbox` (real SQLite file, WAL, synchronous=NORMAL) drained
   by `edge_node.uplink.link.Link`:
   (a) enqueue alone (`put_many` in chunks, each awaited until committed),
   (b) drain of a pre-filled outbox (from link start to the last PUBACK),
   (c) end to end: a producer `put_many`s chunks while the connected link drains, until the last
       PUBACK;
   (d) the same with delivery confirmed end to end: every message carries a seq, a confirmer (a paho
       subscriber standing in for the bridge's Confirmer, with its real range code) confirms what it
       received every 0.1 s, and the time runs until the outbox is empty. The same subscriber takes
       the messages of (c) too, without confirming, so the ratio (d)/(c) is the drain cost of
       confirmed delivery.
   For 200 B and 20 KB payloads. Messages are built before the clock starts, for both sides.
3. RSS of a fresh process holding an outbox with 1,000 vs 1,000,000 queued 200 B messages, right
   after enqueueing them and after reopening the file (each in its own child process).

The last line is the headline: end-to-end durable 200 B throughput over bare paho QoS 1
(target >= 0.5).

Run: `.venv/bin/python bench/outbox.py` (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cloud_bridge.ingest.confirm import ranges_of, seq_of
from devservers import Mosquitto
from edge_node.uplink.link import IncomingMessage, Link, LinkConfig
from edge_node.uplink.outbox import Outbox, OutMessage, Priority
from edge_node.uplink.outbox.sent import Confirming
from schemas import Confirm, decode, encode, new_msg_id

log = logging.getLogger(__name__)

TOPIC = "bench/d1/results"
STATUS = "bench/d1/status"
CONFIRM_TOPIC = "bench/d1/confirm"
CONFIRM_EVERY_S = 0.1
OUTBOX_MAX_BYTES = 1 << 31  # nothing is evicted: eviction is not what is measured
PUT_CHUNK = 500  # messages per put_many, what a busy producer hands over per loop iteration
RSS_CHUNK = 5_000
WAIT_S = 60.0  # bound on every wait for PUBACKs; a stuck run fails instead of hanging
POLL_S = 0.002  # the link has no "all acked" event; its counters are polled on this period
SIZES = ((200, 20_000), (20_000, 2_000))  # (payload bytes, messages)
RSS_COUNTS = (1_000, 1_000_000)
RSS_BUDGET_S = 240.0  # a loaded 2-core machine needs far more than the ~15 s of an idle one
ROUNDS = 3


@dataclass(frozen=True)
class Rate:
    """`n` messages in `seconds`."""

    name: str
    size: int
    n: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.n / self.seconds

    @property
    def mib_per_s(self) -> float:
        return self.n * self.size / self.seconds / (1 << 20)


@dataclass(frozen=True)
class RssSample:
    count: int
    baseline_mib: float
    filled_mib: float
    reopened_mib: float
    enqueue_s: float
    file_mib: float


def messages(n: int, size: int, start: int = 0) -> list[OutMessage]:
    payload = b"x" * size
    return [OutMessage(TOPIC, payload, Priority.RESULTS, f"m{i:08d}") for i in range(start, start + n)]


def confirmed_messages(outbox: Outbox, n: int, size: int) -> list[OutMessage]:
    """Messages that carry their seq in a JSON payload, as the bridge reads it."""
    out = []
    for i in range(n):
        seq = outbox.next_seq()
        payload = orjson.dumps({"seq": seq, "pad": "x" * max(0, size - 30)})
        out.append(OutMessage(TOPIC, payload, Priority.RESULTS, f"c{i:08d}", seq=seq))
    return out


class Confirmer:
    """Stands in for the bridge: takes the messages and (with `confirm`) confirms their seqs in
    batches with the bridge's range code. Run without `confirm` beside (c), so that both runs pay
    the same receiver on this machine and their ratio is the cost of confirming alone."""

    def __init__(self, host: str, port: int, epoch: str, confirm: bool = True) -> None:
        self.epoch = epoch
        self.confirm = confirm
        self.seqs: list[int] = []
        self.sent_bytes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="confirmer", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=30)
        self.client.subscribe(TOPIC, qos=1)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        seq = seq_of(msg.payload)
        if seq is not None and self.confirm:
            with self._lock:
                self.seqs.append(seq)

    def _run(self) -> None:
        while not self._stop.wait(CONFIRM_EVERY_S):
            with self._lock:
                seqs, self.seqs = self.seqs, []
            if seqs:
                ranges = ranges_of(seqs)
                confirm = Confirm(
                    msg_id=new_msg_id(),
                    fleet_id="bench",
                    device_id="d1",
                    ts=time.time(),
                    epoch=self.epoch,
                    ranges=ranges,
                )
                payload = encode(confirm)
                self.sent_bytes += len(payload)
                self.client.publish(CONFIRM_TOPIC, payload, qos=1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.disconnect()
        self.client.loop_stop()


# ---- bare paho ------------------------------------------------------------------------------
class _AckCounter:
    """Counts PUBACKs on paho's network thread and signals when `target` arrived."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.acked = 0
        self.failed = 0
        self.done = threading.Event()

    def on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Properties | None
    ) -> None:
        if reason.is_failure:
            self.failed += 1
        self.acked += 1
        if self.acked >= self.target:
            self.done.set()


def bare_paho(host: str, port: int, size: int, n: int, window: int) -> Rate:
    """Publish n QoS 1 messages with paho's own queue and window; time until the last PUBACK."""
    counter = _AckCounter(n)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bare", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    client.on_publish = counter.on_publish
    client.connect(host, port, keepalive=30)
    client.loop_start()
    try:
        payload = b"x" * size
        start = time.perf_counter()
        for _ in range(n):
            info = client.publish(TOPIC, payload, qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"paho refused a publish: rc={info.rc}")
        if not counter.done.wait(WAIT_S):
            raise RuntimeError(f"bare paho: only {counter.acked}/{n} PUBACKs within {WAIT_S} s")
        seconds = time.perf_counter() - start
    finally:
        client.disconnect()
        client.loop_stop()
    if counter.failed:
        raise RuntimeError(f"bare paho: broker rejected {counter.failed} publishes")
    return Rate("bare paho QoS 1", size, n, seconds)


# ---- the durable path -----------------------------------------------------------------------
def _status(text: str) -> OutMessage:
    return OutMessage(STATUS, text.encode(), Priority.CONTROL, f"status-{text}", retain=True)


async def _ignore(msg: IncomingMessage) -> None:
    log.debug("unexpected message topic=%s", msg.topic)


@asynccontextmanager
async def running_link(outbox: Outbox, host: str, port: int) -> AsyncIterator[Link]:
    """A Link draining `outbox` (and taking confirmations for it), closed on the way out."""

    def on_message(msg: IncomingMessage) -> None:
        if msg.topic == CONFIRM_TOPIC:
            confirm = decode(msg.payload, Confirm)
            outbox.confirm(confirm.epoch, [(a, b) for a, b in confirm.ranges])

    link = Link(
        LinkConfig(host=host, port=port, client_id="bench-d1", protocol="mqtt5"),
        outbox,
        will=lambda connection: _status("offline"),
        birth=lambda connection: _status("online"),
        subscriptions=[(CONFIRM_TOPIC, 1)] if outbox.delivery.mode == "confirmed" else [],
        on_message=on_message if outbox.delivery.mode == "confirmed" else _ignore,
    )
    task = asyncio.create_task(link.run(), name="bench-link")
    try:
        yield link
    finally:
        if not task.done():
            await asyncio.wait_for(link.close(drain_timeout=5.0), WAIT_S)
        await asyncio.wait_for(task, WAIT_S)


async def wait_published(link: Link, target: int) -> None:
    """Bounded wait until the link counted `target` PUBACKs (it exposes counters, not events)."""
    deadline = time.monotonic() + WAIT_S
    while link.stats.published < target:
        if link.stats.puback_failures:
            raise RuntimeError(f"broker rejected {link.stats.puback_failures} publishes")
        if time.monotonic() > deadline:
            raise RuntimeError(f"link: only {link.stats.published}/{target} PUBACKs within {WAIT_S} s")
        await asyncio.sleep(POLL_S)


async def enqueue(outbox: Outbox, msgs: Sequence[OutMessage]) -> None:
    for i in range(0, len(msgs), PUT_CHUNK):
        await outbox.put_many(msgs[i : i + PUT_CHUNK])


async def durable(work: Path, host: str, port: int, size: int, n: int) -> list[Rate]:
    """(a) enqueue alone, (b) drain of the filled outbox, (c) put + drain concurrently, then (c) with
    a subscriber taking the messages, and (d) with it confirming them."""
    msgs = messages(n, size)
    outbox = await Outbox.open(work / f"prefill-{size}.db", OUTBOX_MAX_BYTES)
    try:
        start = time.perf_counter()
        await enqueue(outbox, msgs)
        enq = Rate("outbox enqueue (put_many)", size, n, time.perf_counter() - start)
        start = time.perf_counter()
        async with running_link(outbox, host, port) as link:
            await wait_published(link, n + 1)  # + the birth message
            drain = Rate("outbox drain, pre-filled", size, n, time.perf_counter() - start)
    finally:
        await outbox.close()

    e2e = await end_to_end(work / f"e2e-{size}.db", host, port, size, n, None)
    taken = await end_to_end(work / f"taken-{size}.db", host, port, size, n, False)
    confirmed = await end_to_end(work / f"confirmed-{size}.db", host, port, size, n, True)
    return [enq, drain, e2e, taken, confirmed]


async def end_to_end(path: Path, host: str, port: int, size: int, n: int, confirm: bool | None) -> Rate:
    """Put n messages while the link drains; time until the last PUBACK, or until the last
    confirmation (`confirm`). A subscriber takes the messages unless `confirm` is None."""
    outbox = await Outbox.open(path, OUTBOX_MAX_BYTES, confirming=Confirming() if confirm else None)
    receiver = None if confirm is None else await asyncio.to_thread(Confirmer, host, port, outbox.epoch, confirm)
    try:
        msgs = confirmed_messages(outbox, n, size)
        if not confirm:
            msgs = [OutMessage(TOPIC, m.payload, m.priority, m.msg_id) for m in msgs]
        async with running_link(outbox, host, port) as link:
            async with asyncio.timeout(WAIT_S):
                await link.wait_connected()
            await wait_published(link, 1)  # the birth: the link is idle and connected now
            start = time.perf_counter()
            await enqueue(outbox, msgs)
            if confirm:
                await wait_confirmed(outbox)
            else:
                await wait_published(link, n + 1)
            seconds = time.perf_counter() - start
    finally:
        if receiver is not None:
            await asyncio.to_thread(receiver.close)
        await outbox.close()
    name = {
        None: "outbox end to end (put+drain)",
        False: "  ... a subscriber taking them",
        True: "  ... confirmed by it",
    }
    return Rate(name[confirm], size, n, seconds)


async def wait_confirmed(outbox: Outbox) -> None:
    """Bounded wait until the confirmer confirmed every message (the outbox holds only the birth)."""
    deadline = time.monotonic() + WAIT_S
    while outbox.depth > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"confirmed: {outbox.depth} rows left after {WAIT_S} s")
        await asyncio.sleep(POLL_S)


# ---- RSS ------------------------------------------------------------------------------------
def _rss_mib() -> float:
    return float(psutil.Process().memory_info().rss) / (1 << 20)


async def rss_fill(path: Path, count: int) -> dict[str, float]:
    """Child process: enqueue `count` 200 B messages, chunk by chunk, and report RSS."""
    baseline = _rss_mib()
    outbox = await Outbox.open(path, OUTBOX_MAX_BYTES)
    start = time.perf_counter()
    try:
        for first in range(0, count, RSS_CHUNK):
            await outbox.put_many(messages(min(RSS_CHUNK, count - first), 200, first))
        seconds = time.perf_counter() - start
        filled = _rss_mib()
        depth = outbox.depth
    finally:
        await outbox.close()
    if depth != count:
        raise RuntimeError(f"outbox holds {depth} rows, expected {count}")
    return {"baseline": baseline, "rss": filled, "seconds": seconds}


async def rss_reopen(path: Path, count: int) -> dict[str, float]:
    """Child process: open an existing outbox (its index is loaded) and report RSS."""
    baseline = _rss_mib()
    outbox = await Outbox.open(path, OUTBOX_MAX_BYTES)
    try:
        rss, depth = _rss_mib(), outbox.depth
    finally:
        await outbox.close()
    if depth != count:
        raise RuntimeError(f"reopened outbox holds {depth} rows, expected {count}")
    return {"baseline": baseline, "rss": rss, "seconds": 0.0}


def _child(mode: str, path: Path, count: int, timeout: float) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--rss-child", mode, str(path), str(count)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"rss child {mode} count={count} failed rc={out.returncode}:\n{out.stderr}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def rss_sample(work: Path, count: int, timeout: float) -> RssSample:
    path = work / f"rss-{count}.db"
    filled = _child("fill", path, count, timeout)
    reopened = _child("reopen", path, count, timeout)
    file_bytes = sum(p.stat().st_size for p in work.glob(f"rss-{count}.db*"))
    return RssSample(
        count=count,
        baseline_mib=filled["baseline"],
        filled_mib=filled["rss"],
        reopened_mib=reopened["rss"],
        enqueue_s=filled["seconds"],
        file_mib=file_bytes / (1 << 20),
    )


# ---- report ---------------------------------------------------------------------------------
def print_rates(rates: Sequence[Rate], window: int) -> None:
    print(f"median of {ROUNDS} rounds; {window} publishes in flight for both (the broker's Receive Maximum)")
    print(f"{'path':34} {'payload':>8} {'msgs':>7} {'seconds':>8} {'msg/s':>9} {'MiB/s':>7}")
    for r in rates:
        print(f"{r.name:34} {r.size:>7}B {r.n:>7} {r.seconds:>8.3f} {r.per_s:>9.0f} {r.mib_per_s:>7.1f}")


def print_rss(samples: Sequence[RssSample]) -> None:
    print()
    header = ("queued 200 B msgs", "enqueue s", "file MiB", "RSS base", "RSS filled", "RSS reopen")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (18, 9, 9, 9, 10, 10), strict=True)))
    for s in samples:
        print(
            f"{s.count:>18} {s.enqueue_s:>9.2f} {s.file_mib:>9.1f} {s.baseline_mib:>9.1f}"
            f" {s.filled_mib:>10.1f} {s.reopened_mib:>10.1f}"
        )
    small, large = samples[0], samples[-1]
    grow = large.filled_mib - small.filled_mib
    per_row = grow * (1 << 20) / max(1, large.count - small.count)
    print(f"RSS growth {small.count} -> {large.count} rows: {grow:.1f} MiB ({per_row:.0f} B per queued row)")


def ratio_of(rates: Sequence[Rate], name: str, size: int) -> Rate:
    return next(r for r in rates if r.name == name and r.size == size)


async def throughput(work: Path, mosq: Mosquitto) -> list[Rate]:
    """ROUNDS rounds, bare and durable interleaved so drift hits both; the median round of each."""
    runs: dict[tuple[str, int], list[Rate]] = {}
    window = mosq.max_inflight_messages  # the broker's Receive Maximum, which also caps the link
    for round_no in range(ROUNDS):
        for size, n in SIZES:
            bare = await asyncio.to_thread(bare_paho, mosq.host, mosq.port, size, n, window)
            rates = [bare, *await durable(work / f"round{round_no}", mosq.host, mosq.port, size, n)]
            for r in rates:
                runs.setdefault((r.name, r.size), []).append(r)
    return [sorted(rs, key=lambda r: r.seconds)[len(rs) // 2] for rs in runs.values()]


def main_bench() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-outbox-") as tmp:
        work = Path(tmp)
        with Mosquitto(work / "broker", persistence=False) as mosq:
            rates = asyncio.run(throughput(work, mosq))
            if mosq.dropped_messages_logged():
                raise RuntimeError("broker logged dropped messages (docs/traps.md #1)")
        print_rates(rates, mosq.max_inflight_messages)
        deadline = time.monotonic() + RSS_BUDGET_S
        samples = [rss_sample(work, count, max(1.0, deadline - time.monotonic())) for count in RSS_COUNTS]
        print_rss(samples)
    bare = ratio_of(rates, "bare paho QoS 1", 200)
    e2e = ratio_of(rates, "outbox end to end (put+drain)", 200)
    for size, _ in SIZES:
        taken = ratio_of(rates, "  ... a subscriber taking them", size)
        confirmed = ratio_of(rates, "  ... confirmed by it", size)
        print(
            f"confirmed delivery, {size} B: {confirmed.per_s / taken.per_s:.2f}x the throughput of deleting on PUBACK"
        )
    print(f"ratio {e2e.per_s / bare.per_s:.2f} outbox/bare-paho")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rss-child", nargs=3, metavar=("MODE", "PATH", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    if args.rss_child:
        mode, path, count = args.rss_child
        job: Callable[[Path, int], Any] = rss_fill if mode == "fill" else rss_reopen
        print(json.dumps(asyncio.run(job(Path(path), int(count)))))
        return
    main_bench()


if __name__ == "__main__":
    main()
