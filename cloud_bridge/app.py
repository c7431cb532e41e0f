"""The bridge process: one MQTT connection feeding ingestion (and OTA, clock, alerts) and, by default,
a second one for escalation requests and replies (cloud_bridge/escalation/session.py), under one
TaskGroup.

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
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from cloud_bridge.clock import CLOCK_SUFFIX, ClockServer, clock_filter
from cloud_bridge.config import BridgeConfig
from cloud_bridge.drift.alerts import AlertPublisher
from cloud_bridge.drift.store import DriftStore, load_reference_mixes
from cloud_bridge.errors import BridgeError
from cloud_bridge.escalation import session as escalation_session
from cloud_bridge.escalation.escalator import CloudModel, Escalator, escalation_filter
from cloud_bridge.improve.escalation_value import EscalationAdvice
from cloud_bridge.improve.worker import ImproveWorker
from cloud_bridge.ingest.admission import ingest_filters
from cloud_bridge.ingest.confirm import Confirmer
from cloud_bridge.ingest.ingestor import Ingestor
from cloud_bridge.models.store import ModelStore
from cloud_bridge.mqtt import Incoming, MqttConnection, SharedProbe
from cloud_bridge.ota.commands import CommandSender
from cloud_bridge.ota.delivery import MODEL_REQUEST_SUFFIX, ChunkServer, delivery_filter
from cloud_bridge.ota.deltas import DeltaStore
from cloud_bridge.ota.keys import load_signer
from cloud_bridge.registry import Registry
from cloud_bridge.registry.retention import prune_registry
from cloud_bridge.rollout.driver import RolloutDriver
from cloud_bridge.samples.archive import prune_samples
from cloud_bridge.samples.feed import SampleFeed
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
        self.drift: DriftStore | None = None
        self.alerts: AlertPublisher | None = None
        self._alerts_task: asyncio.Task[None] | None = None
        self.escalator: Escalator | None = None
        self.advice = EscalationAdvice()
        self.ingestor: Ingestor | None = None
        self.confirmer: Confirmer | None = None
        self.feed = SampleFeed(config.topics, self._publish_chunk)
        self.clock: ClockServer | None = None
        self.mqtt: MqttConnection | None = None
        # Escalations' own session ([escalation] session = "own"); None: they share `mqtt`.
        self.escalation_mqtt: MqttConnection | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.models = ModelStore(config.model_store_dir, self.registry)
        self.deltas = DeltaStore(self.models, config.ota.delta_max_fraction)
        self.chunks: ChunkServer | None = None
        # None when no [ota] signing_key is configured: OTA commands are disabled.
        self.commands: CommandSender | None = None
        self.rollouts: RolloutDriver | None = None
        self.improver: ImproveWorker | None = None  # [improve] in_bridge: loops driven here
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
            self.tsdb = TsdbWriter(TsdbSettings.from_config(cfg.influx, Path(cfg.state_dir)))
        subscriptions = [(f, 1) for f in ingest_filters(self.topics, cfg.fleet.share_group, cfg.fleet.shared)]
        model: CloudModel | None = None
        if cfg.escalation.model is not None:
            model = await asyncio.to_thread(CloudModel, Path(cfg.escalation.model), cfg.escalation.providers)
            if cfg.escalation.session == "own":
                self.escalation_mqtt = escalation_session.escalation_connection(cfg, self._submit_escalation)
            else:
                subscriptions.append((escalation_filter(self.topics, cfg.fleet.share_group, cfg.fleet.shared), 1))
        subscriptions.append((delivery_filter(self.topics, cfg.fleet.share_group, cfg.fleet.shared), 1))
        subscriptions.append((clock_filter(self.topics, cfg.fleet.share_group, cfg.fleet.shared), 1))
        probe = SharedProbe(
            cfg.fleet.share_group, f"{self.topics.prefix}/_probe/{cfg.mqtt.client_id}", cfg.fleet.shared_fallback
        )
        self.mqtt = MqttConnection(cfg.mqtt, subscriptions, self._dispatch, probe)
        self.confirmer = Confirmer(self.topics, self._publish_expiring, cfg.ingest.confirm_interval_s)
        self.clock = ClockServer(self.topics, self._publish_reply, self.mqtt.ack)
        self._setup_ota(self.mqtt)
        if cfg.rollout.enabled:
            # The owner id is per process: a restarted bridge re-claims only after its old lease expires
            # (or at once, since a clean stop releases its leases).
            owner = f"{cfg.mqtt.client_id}:{uuid.uuid4().hex[:8]}"
            self.rollouts = RolloutDriver(self.registry, self.models, self.commands, cfg.rollout, owner, self.tsdb)
        if cfg.improve.in_bridge:
            owner = f"{cfg.mqtt.client_id}:improve:{uuid.uuid4().hex[:8]}"
            self.improver = ImproveWorker.for_bridge(cfg, self.registry, self.models, owner, self.tsdb)
        await self._setup_drift()
        self.ingestor = Ingestor(
            self.topics,
            self.registry,
            cfg.ingest,
            self.mqtt.ack,
            self.tsdb,
            drift=self.drift,
            on_alerts=self.alerts.submit if self.alerts is not None else None,
            confirmer=self.confirmer,
            on_samples=self.feed.stored,
        )
        if model is not None:
            session = self.escalation_mqtt or self.mqtt
            self.escalator = Escalator(self.topics, model, cfg.escalation, session.publish, session.ack)
            # Where labeled samples showed the cloud model no better than a device's (cloud-bridge
            # improve escalation --apply), replies tell the device to stop asking (pause_s).
            self.escalator.pause_for = self.advice.pause_for
            log.info(
                "cloud model loaded name=%s version=%s sha256=%s providers=%s",
                model.ref.name,
                model.ref.version,
                model.ref.sha256[:12],
                ",".join(model.providers),
            )
        await self.refresh_advice()  # before the first reply: a restart keeps the pauses
        try:
            async with asyncio.TaskGroup() as tg:
                connections = [self.mqtt] + ([self.escalation_mqtt] if self.escalation_mqtt is not None else [])
                readies = [asyncio.Event() for _ in connections]
                for connection, ready in zip(connections, readies, strict=True):
                    tg.create_task(connection.run(ready))
                tg.create_task(self._ready_when(readies))
                workers = [tg.create_task(self.ingestor.run())]
                if self.alerts is not None:
                    self._alerts_task = tg.create_task(self.alerts.run(), name="alerts")
                if self.chunks is not None:
                    workers.append(tg.create_task(self.chunks.run()))
                if self.escalator is not None:
                    workers.append(tg.create_task(self.escalator.run()))
                if self.rollouts is not None:
                    workers.append(tg.create_task(self.rollouts.run(self.ready), name="rollouts"))
                if self.improver is not None:  # stops after its pass once _stop is set; hands its leases back
                    improve = self.improver.run(self._stop, contain_errors=True)
                    workers.append(tg.create_task(improve, name="improve"))
                tsdb_task = tg.create_task(self.tsdb.run()) if self.tsdb is not None else None
                status_task = tg.create_task(self._status_loop())
                clash_task = None
                if self.escalation_mqtt is not None:  # a watch for the two sessions taking each other over
                    clash_task = tg.create_task(self._escalations_on_main_if_clash(), name="escalation-clash")
                confirm_task = tg.create_task(self.confirmer.run(), name="confirmations")
                workers.append(tg.create_task(self.feed.run(), name="samples-feed"))
                await self._stop.wait()
                await self._drain(workers, tsdb_task, confirm_task)
                status_task.cancel()
                if clash_task is not None:
                    clash_task.cancel()
        except* BridgeError as group:
            # A task refused to go on (e.g. a broker that ignores $share with fallback off): surface the
            # bridge's own error, which the CLI prints with its fix, not an exception group.
            raise group.exceptions[0] from None
        finally:
            if self.tsdb is not None:
                self.tsdb.dispose()
            await self.registry.close()
        log.info("bridge stopped")

    async def _escalations_on_main_if_clash(self) -> None:
        """Move escalations to the [mqtt] session if the broker keeps the two sessions of one login
        from coexisting (session.watch_for_clash): answers on the shared session beat no answers."""
        assert self.mqtt is not None and self.escalation_mqtt is not None and self.escalator is not None
        own, fleet = self.escalation_mqtt, self.config.fleet
        await escalation_session.watch_for_clash(self.mqtt, own)
        self.escalation_mqtt = None
        shared = escalation_filter(self.topics, fleet.share_group, fleet.shared)
        await escalation_session.move_to_main_session(self.mqtt, own, self.escalator, shared, self.config.mqtt.username)

    async def _publish_expiring(self, topic: str, payload: bytes, qos: int, expiry_s: int | None) -> None:
        assert self.mqtt is not None
        await self.mqtt.publish(topic, payload, qos, message_expiry_s=expiry_s)

    async def _publish_reply(
        self, topic: str, payload: bytes, qos: int, correlation: bytes | None, expiry_s: int | None
    ) -> None:
        assert self.mqtt is not None
        await self.mqtt.publish(topic, payload, qos, correlation, message_expiry_s=expiry_s)

    async def _setup_drift(self) -> None:
        drift = self.config.drift
        if not drift.enabled:
            log.info("drift detection disabled: [drift] enabled = false")
            return
        mixes = await asyncio.to_thread(load_reference_mixes, drift.reference_models)
        self.drift = DriftStore(drift, self.registry.engine.dialect.name, mixes)
        self.alerts = AlertPublisher(self.topics, self.registry, self._publish_alert)
        log.info("drift detection enabled reference_models=%d", len(mixes))

    async def _publish_alert(self, topic: str, payload: bytes, qos: int) -> None:
        assert self.mqtt is not None
        await self.mqtt.publish(topic, payload, qos)

    async def _drain_alerts(self) -> None:
        # After ingestion stopped (it may still have raised alerts), before the connection closes.
        if self.alerts is None or self._alerts_task is None:
            return
        await self.alerts.close()
        _done, pending = await asyncio.wait({self._alerts_task}, timeout=_DRAIN_TIMEOUT_S)
        for task in pending:
            log.warning("alerts unpublished at shutdown count=%d (published at the next start)", self.alerts.pending)
            task.cancel()

    def _setup_ota(self, mqtt: MqttConnection) -> None:
        ota = self.config.ota
        self.chunks = ChunkServer(self.topics, self.models, ota, self._publish_chunk, mqtt.ack, self.deltas)
        if ota.signing_key is None:
            log.info("ota commands disabled: no [ota] signing_key configured (chunks are still served)")
            return
        signer = load_signer(Path(ota.signing_key), ota.key_id)
        self.commands = CommandSender(
            self.topics,
            signer.key,
            signer.key_id,
            self._publish_command,
            ota.chunk_size,
            ota.command_ttl_s,
            registry=self.registry,
            models=self.models,
            deltas=self.deltas,
        )
        log.info("ota commands enabled key_id=%s model_store=%s", signer.key_id, self.models.root)

    async def _publish_chunk(self, topic: str, payload: bytes, qos: int) -> None:
        assert self.mqtt is not None
        await self.mqtt.publish(topic, payload, qos)

    async def _publish_command(self, topic: str, payload: bytes, qos: int, expiry_s: int | None) -> None:
        assert self.mqtt is not None
        await self.mqtt.publish(topic, payload, qos, message_expiry_s=expiry_s)

    async def _ready_when(self, readies: list[asyncio.Event]) -> None:
        """`ready` once every connection is subscribed (the first time)."""
        for ready in readies:
            await ready.wait()
        self.ready.set()

    def _submit_escalation(self, incoming: Incoming) -> None:
        # The escalation session delivers only requests (its probe is handled by the connection).
        assert self.escalator is not None  # made before the connections run
        self.escalator.submit(incoming)

    def _dispatch(self, incoming: Incoming) -> None:
        if incoming.topic.endswith(_ESCALATE_SUFFIX) and self.escalator is not None:
            self.escalator.submit(incoming)
        elif incoming.topic.endswith(MODEL_REQUEST_SUFFIX) and self.chunks is not None:
            self.chunks.submit(incoming)
        elif incoming.topic.endswith(CLOCK_SUFFIX) and self.clock is not None:
            task = asyncio.get_running_loop().create_task(self.clock.answer(incoming))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif self.ingestor is not None:
            self.ingestor.submit(incoming)

    async def _drain(
        self,
        workers: list[asyncio.Task[None]],
        tsdb_task: asyncio.Task[None] | None,
        confirm_task: asyncio.Task[None],
    ) -> None:
        log.info("bridge draining")
        assert self.ingestor is not None and self.mqtt is not None
        await self.ingestor.close()
        await self.feed.close()
        if self.escalator is not None:
            await self.escalator.close()
        if self.rollouts is not None:
            self.rollouts.close()
        if self.chunks is not None:
            await self.chunks.close()
        _done, pending = await asyncio.wait(workers, timeout=_DRAIN_TIMEOUT_S)
        for task in pending:
            log.warning("drain timed out, cancelling worker task=%s", task.get_name())
            task.cancel()
        await self._drain_alerts()
        confirm_task.cancel()
        if self.confirmer is not None:
            await self.confirmer.flush()  # what ingestion stored last: devices may delete it now
        await self.flush_agreement()
        if self.tsdb is not None and tsdb_task is not None:
            await self.tsdb.close()
            if not await self.tsdb.flush(deadline_s=_DRAIN_TIMEOUT_S):
                log.warning("tsdb flush timed out pending=%d", self.tsdb.pending)
            await asyncio.wait({tsdb_task}, timeout=_DRAIN_TIMEOUT_S)
        if self.escalation_mqtt is not None:
            await self.escalation_mqtt.close()
        await self.mqtt.close()
        self.log_status()

    async def flush_agreement(self) -> None:
        """Persist escalation agreement counts (and send them to the TSDB)."""
        if self.escalator is None:
            return
        counts = self.escalator.agreement.take()
        if not counts:
            return
        try:
            await self.registry.add_agreement(counts)
        except SQLAlchemyError as exc:
            # E.g. SQLite's lock held past its busy timeout by an ingest batch on a starved machine:
            # measured at 10,000 devices, where this stopped the bridge. Kept for the next flush.
            self.escalator.agreement.restore(counts)
            log.error(
                "escalation agreement not stored devices=%d error=%s (retried at the next flush)", len(counts), exc
            )
            return
        if self.tsdb is not None:
            now = time.time()
            self.tsdb.add(agreement_line(f, d, v, agreed, answered, now) for (f, d, v), (answered, agreed) in counts)

    async def refresh_advice(self) -> None:
        """Re-read the escalation advice (a device resumes asking once a new assessment says the
        cloud helps there again)."""
        if self.escalator is not None:
            await self.advice.refresh(self.registry)

    async def _status_loop(self) -> None:
        next_prune = 0.0
        while True:
            await asyncio.sleep(self.config.status_interval_s)
            await self.flush_agreement()
            await self.refresh_advice()
            if time.monotonic() >= next_prune:
                try:
                    await self.prune()
                    next_prune = time.monotonic() + _PRUNE_INTERVAL_S
                except SQLAlchemyError as exc:
                    log.error("registry prune failed error=%s (retried at the next status interval)", exc)
            self.log_status()

    async def prune(self) -> int:
        """Drop dedup ids older than `[ingest] seen_retention_s` (returns how many), bound result and
        telemetry rows by `[registry]` retention and the samples archive by `[samples] max_rows` / `max_age_days`."""
        pruned = await self.registry.prune_seen(time.time() - self.config.ingest.seen_retention_s)
        if pruned:
            log.info("pruned seen message ids count=%d", pruned)
        await prune_registry(self.registry, self.config.registry)
        samples = await prune_samples(self.registry, self.config.samples, time.time())
        if samples:
            log.info(
                "pruned archived samples count=%d max_rows=%d max_age_days=%g",
                samples,
                self.config.samples.max_rows,
                self.config.samples.max_age_days,
            )
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
            "escalations_answered=%d escalations_expired=%d %s %s connected=%s unacked=%d escalation_backlog=%d "
            "ingest_s idle=%.1f plan=%.1f commit=%.1f commit_wait=%.1f after=%.1f batches=%d largest_batch=%d "
            "escalation_session=%s escalation_connected=%s escalation_unacked=%d",
            rate,
            received,
            ing.stored if ing else 0,
            ing.dead_letters if ing else 0,
            ing.duplicates if ing else 0,
            self.ingestor.backlog if self.ingestor else 0,
            esc.answered if esc else 0,
            esc.expired if esc else 0,
            self.tsdb.status() if self.tsdb is not None else "tsdb=off",
            " ".join(x.status() for x in (self.drift, self.confirmer) if x is not None),
            self.mqtt.connected if self.mqtt is not None else False,
            self.mqtt.unacked if self.mqtt is not None else 0,
            self.escalator.backlog if self.escalator is not None else 0,
            ing.idle_s if ing else 0.0,
            ing.plan_s if ing else 0.0,
            ing.commit_s if ing else 0.0,
            ing.commit_wait_s if ing else 0.0,
            ing.after_s if ing else 0.0,
            ing.batches if ing else 0,
            ing.largest_batch if ing else 0,
            "own" if self.escalation_mqtt is not None else "shared",
            (self.escalation_mqtt or self.mqtt).connected if self.mqtt is not None else False,
            self.escalation_mqtt.unacked if self.escalation_mqtt is not None else 0,
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
