"""The bridge process: one MQTT connection feeding ingestion and escalation, under one TaskGroup.

Shutdown (`stop()`, or SIGTERM/SIGINT via `run_bridge`) drains in order: stop taking new work, store
what has arrived, answer the escalations in flight, flush agreement counts and the TSDB buffer, then
disconnect. Messages still unacked at that point are redelivered by the broker to the next session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from cloud_bridge.config import BridgeConfig
from cloud_bridge.escalation import CloudModel, Escalator, escalation_filter
from cloud_bridge.ingest import Ingestor, ingest_filters
from cloud_bridge.mqtt import Incoming, MqttConnection
from cloud_bridge.registry import Registry
from cloud_bridge.tsdb import TsdbSettings, TsdbWriter, agreement_line
from schemas.topics import Channel

log = logging.getLogger(__name__)

_DRAIN_TIMEOUT_S = 20.0
_PRUNE_INTERVAL_S = 3600.0
_ESCALATE_SUFFIX = "/" + Channel.ESCALATE.value


@dataclass
class _Rates:
    at: float
    received: int


class Bridge:
    """Wires config -> registry, TSDB writer, MQTT connection, ingestor and escalator."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self.topics = config.topics
        self.registry = Registry(config.registry_url)
        self.tsdb: TsdbWriter | None = None
        self.escalator: Escalator | None = None
        self.ingestor: Ingestor | None = None
        self.mqtt: MqttConnection | None = None
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._rates = _Rates(time.monotonic(), 0)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        cfg = self.config
        await asyncio.to_thread(Path(cfg.state_dir).mkdir, parents=True, exist_ok=True)
        await self.registry.create()
        if cfg.influx.url is not None:
            self.tsdb = TsdbWriter(
                TsdbSettings(
                    url=cfg.influx.url,
                    org=cfg.influx.org,
                    bucket=cfg.influx.bucket,
                    token=cfg.influx.token,
                    spill_path=Path(cfg.state_dir) / "tsdb-spill.lp",
                    batch_lines=cfg.influx.batch_lines,
                    flush_interval_s=cfg.influx.flush_interval_s,
                    buffer_max_lines=cfg.influx.buffer_max_lines,
                    retry_max_s=cfg.influx.retry_max_s,
                )
            )
        subscriptions = [(f, 1) for f in ingest_filters(self.topics, cfg.fleet.share_group, cfg.fleet.shared)]
        model: CloudModel | None = None
        if cfg.escalation.model is not None:
            model = await asyncio.to_thread(CloudModel, Path(cfg.escalation.model), cfg.escalation.providers)
            subscriptions.append((escalation_filter(self.topics, cfg.fleet.share_group, cfg.fleet.shared), 1))
        self.mqtt = MqttConnection(cfg.mqtt, subscriptions, self._dispatch)
        self.ingestor = Ingestor(self.topics, self.registry, cfg.ingest, self.mqtt.ack, self.tsdb)
        if model is not None:
            self.escalator = Escalator(self.topics, model, cfg.escalation, self._publish, self.mqtt.ack)
            log.info(
                "cloud model loaded name=%s version=%s sha256=%s providers=%s",
                model.ref.name,
                model.ref.version,
                model.ref.sha256[:12],
                ",".join(model.providers),
            )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.mqtt.run(self.ready))
                workers = [tg.create_task(self.ingestor.run())]
                if self.escalator is not None:
                    workers.append(tg.create_task(self.escalator.run()))
                tsdb_task = tg.create_task(self.tsdb.run()) if self.tsdb is not None else None
                status_task = tg.create_task(self._status_loop())
                await self._stop.wait()
                await self._drain(workers, tsdb_task)
                status_task.cancel()
        finally:
            if self.tsdb is not None:
                self.tsdb.dispose()
            await self.registry.close()
        log.info("bridge stopped")

    async def _publish(self, topic: str, payload: bytes, qos: int, correlation: bytes | None) -> None:
        assert self.mqtt is not None
        await self.mqtt.publish(topic, payload, qos, correlation)

    def _dispatch(self, incoming: Incoming) -> None:
        if incoming.topic.endswith(_ESCALATE_SUFFIX) and self.escalator is not None:
            self.escalator.submit(incoming)
        elif self.ingestor is not None:
            self.ingestor.submit(incoming)

    async def _drain(self, workers: list[asyncio.Task[None]], tsdb_task: asyncio.Task[None] | None) -> None:
        log.info("bridge draining")
        assert self.ingestor is not None and self.mqtt is not None
        await self.ingestor.close()
        if self.escalator is not None:
            await self.escalator.close()
        _done, pending = await asyncio.wait(workers, timeout=_DRAIN_TIMEOUT_S)
        for task in pending:
            log.warning("drain timed out, cancelling worker task=%s", task.get_name())
            task.cancel()
        await self.flush_agreement()
        if self.tsdb is not None and tsdb_task is not None:
            await self.tsdb.close()
            if not await self.tsdb.flush(deadline_s=_DRAIN_TIMEOUT_S):
                log.warning("tsdb flush timed out pending=%d", self.tsdb.pending)
            await asyncio.wait({tsdb_task}, timeout=_DRAIN_TIMEOUT_S)
        await self.mqtt.close()
        self.log_status()

    async def flush_agreement(self) -> None:
        """Persist escalation agreement counts (and send them to the TSDB)."""
        if self.escalator is None:
            return
        counts = self.escalator.agreement.take()
        if not counts:
            return
        await self.registry.add_agreement(counts)
        if self.tsdb is not None:
            now = time.time()
            self.tsdb.add(agreement_line(f, d, v, agreed, answered, now) for (f, d, v), (answered, agreed) in counts)

    async def _status_loop(self) -> None:
        next_prune = 0.0
        while True:
            await asyncio.sleep(self.config.status_interval_s)
            await self.flush_agreement()
            if time.monotonic() >= next_prune:
                await self.prune()
                next_prune = time.monotonic() + _PRUNE_INTERVAL_S
            self.log_status()

    async def prune(self) -> int:
        """Drop dedup ids older than `[ingest] seen_retention_s`."""
        pruned = await self.registry.prune_seen(time.time() - self.config.ingest.seen_retention_s)
        if pruned:
            log.info("pruned seen message ids count=%d", pruned)
        return pruned

    def log_status(self) -> None:
        now = time.monotonic()
        ing = self.ingestor.stats if self.ingestor is not None else None
        received = ing.received if ing is not None else 0
        rate = (received - self._rates.received) / max(1e-9, now - self._rates.at)
        self._rates = _Rates(now, received)
        esc = self.escalator.stats if self.escalator is not None else None
        log.info(
            "bridge status msgs_per_s=%.1f received=%d stored=%d dead_letters=%d dups=%d backlog=%d "
            "escalations_answered=%d escalations_expired=%d tsdb_pending=%d connected=%s",
            rate,
            received,
            ing.stored if ing else 0,
            ing.dead_letters if ing else 0,
            ing.duplicates if ing else 0,
            self.ingestor.backlog if self.ingestor else 0,
            esc.answered if esc else 0,
            esc.expired if esc else 0,
            self.tsdb.pending if self.tsdb is not None else 0,
            self.mqtt.connected if self.mqtt is not None else False,
        )


@contextlib.asynccontextmanager
async def running_bridge(config: BridgeConfig, ready_timeout_s: float = 15.0) -> AsyncIterator[Bridge]:
    """Run a bridge in this event loop (tests, benches): yields once it is subscribed, drains on exit."""
    bridge = Bridge(config)
    task = asyncio.create_task(bridge.run(), name="bridge")
    ready = asyncio.create_task(bridge.ready.wait())
    await asyncio.wait({task, ready}, timeout=ready_timeout_s, return_when=asyncio.FIRST_COMPLETED)
    if not bridge.ready.is_set():
        ready.cancel()
        bridge.stop()
        if task.done():
            task.result()  # raises the startup error
        task.cancel()
        raise TimeoutError(f"bridge not subscribed within {ready_timeout_s}s")
    try:
        yield bridge
    finally:
        bridge.stop()
        await task


async def run_bridge(config: BridgeConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain and return."""
    bridge = Bridge(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, bridge.stop)
    await bridge.run()
