"""Fault tests of the whole edge node process: kill -9, a cut link, a killed broker.

Every test runs `python -m edge_node.cli run` against a real mosquitto (through a fault-injecting TCP
proxy where the link matters) and checks with a real subscriber that no committed result is lost:
inference ids are "<boot>-<seq>", numbered in commit order, so a loss shows up as a gap.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from demokit.models import DemoModel
from devservers import Mosquitto
from edge_node.uplink.outbox import Outbox
from schemas import Topics, decode_for_topic
from schemas.messages import Telemetry
from tests.config_files import write_edge_config
from tests.mqtt_collector import Answered, Collector
from tests.plugin_servers import TcpProxyFactory
from tests.poll import wait_for
from tests.processes import run_edge_node, stop, wait_logged

_OUTBOX_MAX_BYTES = 64 * 1024 * 1024


def _write_config(tmp_path: Path, port: int, model: Path) -> Path:
    return write_edge_config(
        tmp_path,
        port,
        model,
        routing={"escalate": False},
        telemetry={"interval_s": 1},
        source={"kind": "replay", "rate_hz": 200},
    )


def _split(inference_id: str) -> tuple[str, int]:
    boot, seq = inference_id.rsplit("-", 1)
    return boot, int(seq)


def _result_ids(c: Collector) -> set[str]:
    return {a.inference_id for a in c.answers()}


def _answers(c: Collector) -> int:
    """Answers received so far, repeats included (a results message carries a micro-batch)."""
    return len(c.answers())


def _seqs(ids: set[str], boot: str) -> list[int]:
    return sorted(s for b, s in map(_split, ids) if b == boot)


def _no_gaps(seqs: list[int]) -> bool:
    return bool(seqs) and seqs == list(range(1, seqs[-1] + 1))


def _telemetry_total(c: Collector) -> int:
    windows = [m for m in (r.message() for r in c.on("telemetry")) if isinstance(m, Telemetry)]
    return sum(w.count for w in windows)


def _stored_results(path: Path) -> tuple[int, set[str]]:
    """The result messages still in the outbox file (read with plain sqlite3) and the inference ids
    of their answers."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT topic, payload FROM outbox WHERE topic LIKE '%/results'").fetchall()
    finally:
        conn.close()
    ids = {a.inference_id for topic, payload in rows for a in Answered.of(decode_for_topic(Topics(), topic, payload))}
    return len(rows), ids


async def _outbox_depth(path: Path) -> int:
    outbox = await Outbox.open(path, _OUTBOX_MAX_BYTES)
    try:
        return outbox.depth
    finally:
        await outbox.close()


def test_kill9_then_restart_delivers_every_committed_result(
    mosquitto: Mosquitto, tcp_proxy: TcpProxyFactory, demo_models: dict[str, DemoModel], tmp_path: Path
) -> None:
    proxy = tcp_proxy(mosquitto.host, mosquitto.port)
    config_file = _write_config(tmp_path, proxy.port, demo_models["edge"].path)
    outbox_path = tmp_path / "outbox.sqlite"
    log_path = tmp_path / "edge.log"
    with Collector(mosquitto.host, mosquitto.port, ["fleet/f1/dev-1/#"]) as c:
        with run_edge_node(config_file, log_path) as first:
            c.wait_for(lambda c: _answers(c) >= 100)
            boot1 = _split(next(iter(_result_ids(c))))[0]
            # Blackholing the uplink first makes sure the kill finds committed, unacked rows to recover.
            proxy.blackhole()
            # The outbox file is only observable by polling it.
            # Counted against what the broker passed on: sent rows stay in the outbox too, awaiting a
            # cloud confirmation that no bridge gives here.
            wait_for(
                lambda: len(_stored_results(outbox_path)[1] - _result_ids(c)),
                15,
                "100 undelivered answers in the outbox",
                until=lambda n: n >= 100,
            )
            first.kill()
        before_kill = {i for i in _result_ids(c) if _split(i)[0] == boot1}
        depth = asyncio.run(_outbox_depth(outbox_path))
        messages, stored = _stored_results(outbox_path)
        # The reopened outbox counts every committed results row (they never expire), which hold the
        # answers waited for above (less any whose ack was still being applied at the cut).
        assert depth >= messages and len(stored - before_kill) >= 90, (depth, messages, len(stored - before_kill))
        expected = before_kill | stored
        proxy.restore()
        with run_edge_node(config_file, log_path) as second:
            c.wait_for(lambda c: expected <= _result_ids(c), timeout=20)
            # A SIGTERM before the node installed its handler would end it unclean.
            wait_logged(second, "edge node starting")
            stop(second)
        got = _result_ids(c)
    seqs1 = _seqs(got, boot1)
    assert _no_gaps(seqs1), f"boot 1 seqs have gaps: missing {sorted(set(range(1, seqs1[-1] + 1)) - set(seqs1))}"
    assert seqs1[-1] == max(_split(i)[1] for i in expected)
    assert {_split(i)[0] for i in got} - {boot1}, "the restarted node must publish under a new boot id"


def _assert_complete(c: Collector) -> None:
    """After a clean stop: one boot, seqs without gaps, and telemetry accounts for every result."""

    def complete(c: Collector) -> bool:
        ids = _result_ids(c)
        boots = {_split(i)[0] for i in ids}
        return len(boots) == 1 and _no_gaps(_seqs(ids, boots.pop())) and _telemetry_total(c) == len(ids)

    try:
        c.wait_for(complete, timeout=15)
    except AssertionError:
        ids = _result_ids(c)
        seqs = sorted(_split(i)[1] for i in ids)
        missing = sorted(set(range(1, seqs[-1] + 1)) - set(seqs)) if seqs else []
        raise AssertionError(
            f"results={len(ids)} telemetry_total={_telemetry_total(c)} max_seq={seqs[-1] if seqs else None}"
            f" missing={missing[:20]}"
        ) from None


def test_link_reset_and_blackhole_lose_nothing(
    mosquitto: Mosquitto, tcp_proxy: TcpProxyFactory, demo_models: dict[str, DemoModel], tmp_path: Path
) -> None:
    proxy = tcp_proxy(mosquitto.host, mosquitto.port)
    config_file = _write_config(tmp_path, proxy.port, demo_models["edge"].path)
    log_path = tmp_path / "edge.log"
    with Collector(mosquitto.host, mosquitto.port, ["fleet/f1/dev-1/#"]) as c:
        with run_edge_node(config_file, log_path) as node:
            c.wait_for(lambda c: _answers(c) >= 100)
            proxy.reset()
            proxy.wait_until(lambda s: s.connections_total >= 2 and s.active_connections >= 1, timeout=15)
            seen = _answers(c)
            c.wait_for(lambda c: _answers(c) >= seen + 100)
            proxy.blackhole()
            proxy.wait_until(lambda s: s.bytes_dropped > 0, timeout=10)
            # A few seconds of dead link, the node's keepalive (5 s) must notice by itself.
            cut_at = time.monotonic()
            wait_for(lambda: time.monotonic() - cut_at >= 4.0, 6, "the dead link period")
            reconnects = proxy.stats().connections_total
            proxy.restore()
            proxy.wait_until(lambda s: s.connections_total > reconnects, timeout=20)
            seen = _answers(c)
            c.wait_for(lambda c: _answers(c) >= seen + 100)
            stop(node)
        _assert_complete(c)


def test_broker_killed_and_restarted_loses_nothing(
    mosquitto: Mosquitto, tcp_proxy: TcpProxyFactory, demo_models: dict[str, DemoModel], tmp_path: Path
) -> None:
    proxy = tcp_proxy(mosquitto.host, mosquitto.port)
    config_file = _write_config(tmp_path, proxy.port, demo_models["edge"].path)
    log_path = tmp_path / "edge.log"
    with _PersistentCollector(mosquitto.host, mosquitto.port, ["fleet/f1/dev-1/#"]) as c:
        with run_edge_node(config_file, log_path) as node:
            c.wait_for(lambda c: _answers(c) >= 200)
            # SIGKILL loses what the broker acked but had not delivered yet: a broker property, not the
            # node's. So silence the node's uplink first and let the broker flush to the collector
            # (a marker published after the silence arrives after everything before it).
            proxy.blackhole()
            c.publish("fleet/f1/dev-1/marker", b"m")
            c.wait_for(lambda c: bool(c.on("marker")))
            # Seen here: results the node published right after the restart, before the collector was
            # back, never reached it despite its persistent session; so the node may only reach the
            # broker again once the collector has resubscribed.
            proxy.refuse()
            c.resubscribed.clear()
            mosquitto.kill()
            killed_at = time.monotonic()
            wait_for(lambda: time.monotonic() - killed_at >= 3.0, 5, "the broker outage")
            mosquitto.start()
            assert c.resubscribed.wait(15), "collector did not come back"
            proxy.restore()
            seen = _answers(c)
            c.wait_for(lambda c: _answers(c) >= seen + 100, timeout=25)
            stop(node)
        _assert_complete(c)


class _PersistentCollector(Collector):
    """A collector that reconnects fast and tells when it has resubscribed after a broker restart."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.resubscribed = threading.Event()

        def on_subscribe(*args: object) -> None:
            self._subscribed.set()
            self.resubscribed.set()

        self.client.on_subscribe = on_subscribe

    def __enter__(self) -> _PersistentCollector:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.client.reconnect_delay_set(1, 1)
        self.client.connect(
            self.host, self.port, keepalive=30, clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=props
        )
        self.client.loop_start()
        assert self._subscribed.wait(10), "collector could not subscribe"
        return self
