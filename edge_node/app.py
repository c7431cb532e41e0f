"""The edge node: wires config, model, outbox, MQTT link, source, pipeline and telemetry together.

    source --> queue --> pipeline (micro-batch, ONNX, routing, sampling) --> outbox --> link --> broker
                                 \\--> escalations <-- replies <-- link
    telemetry loop: every interval_s one window --> outbox

Everything runs as tasks of one TaskGroup. `stop()` (SIGTERM/SIGINT) drains: intake stops, queued
inputs finish, outstanding escalations get their answer or time out, the last telemetry window
and an "offline" status go to the outbox, the link drains what it can, then everything closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edge_node import __version__
from edge_node.config import EdgeConfig
from edge_node.errors import OutboxError
from edge_node.inference.batching import intake_bound
from edge_node.inference.model import Classifier
from edge_node.inference.pipeline import Pipeline
from edge_node.input.intake import Intake
from edge_node.input.replay import ReplaySource
from edge_node.input.sources import DirectorySource, InputIds, MqttInputSource, Source, describe
from edge_node.ota.acks import CommandAcks
from edge_node.ota.agent import Installer, OtaAgent, build_agent
from edge_node.ota.boot import Boot, boot_slots
from edge_node.ota.installer import InstallPolicy, SlotManager
from edge_node.ota.slots import SlotStore
from edge_node.routing.escalation import Escalations
from edge_node.routing.sampling import UncertaintySampler
from edge_node.status import StatusLine
from edge_node.telemetry import ResourceProbe, TelemetryContext, Window, build_telemetry
from edge_node.uplink.link import IncomingMessage, Link, LinkConfig
from edge_node.uplink.outbox import Outbox, OutMessage, Priority
from schemas import (
    Channel,
    DecodeError,
    EscalationReply,
    ModelTopic,
    OutboxStats,
    Providers,
    Status,
    decode,
    encode,
    new_msg_id,
)

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 5.0


@dataclass
class NodeStats:
    """What the node did since it started (for logs, tests and the demo summary)."""

    windows: int = 0
    late_replies: int = 0
    outbox_errors: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class EdgeNode:
    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.topics = config.topics
        self.stats = NodeStats()
        self._stop = asyncio.Event()
        self._started_at = time.time()
        self._seq = 0
        self.classifier: Classifier | None = None
        self.outbox: Outbox | None = None
        self.link: Link | None = None
        self.window: Window | None = None
        self.status: StatusLine | None = None
        self.ready = asyncio.Event()
        self._drops = _Deltas()
        self._pipeline: Pipeline | None = None
        self._write_errors_reported = 0
        # Defaults to the node's SlotManager (edge_node/ota/installer.py); set before run() to replace it.
        self.installer: Installer | None = None
        self.ota: OtaAgent | None = None
        # A/B model slots (edge_node/ota/slots.py): the default installer; the model to start with.
        self.slots: SlotManager | None = None
        self._slot_store = SlotStore(config.ota_state_dir / "slots")
        self._boot: Boot | None = None

    @property
    def processed(self) -> int:
        """Inputs answered since the node started (stored uplink or not)."""
        return self._pipeline.processed if self._pipeline is not None else 0

    def stop(self) -> None:
        """Ask the node to drain and exit (safe to call from a signal handler)."""
        self._stop.set()

    # ---- wiring ------------------------------------------------------------------------------
    async def run(self) -> None:
        cfg = self.config
        # The persisted active slot, else the factory model ([model] path); see edge_node/ota/boot.py.
        self._boot = await asyncio.to_thread(
            boot_slots, self._slot_store, cfg.model.path, self._load_model, cfg.ota.crash_loop_limit
        )
        self.classifier = self._boot.classifier
        info = self.classifier.info
        log.info(
            "model loaded name=%s version=%s sha256=%s labels=%d input=%s providers=%s",
            info.ref.name,
            info.ref.version,
            info.ref.sha256[:12],
            len(info.labels),
            list(info.feature_shape),
            list(self.classifier.providers.active),
        )
        self.outbox = await Outbox.open(cfg.outbox.path, cfg.outbox.max_bytes, synchronous=cfg.outbox.synchronous)
        # Drop counters in the file are totals since it was created; telemetry reports this run's.
        self._drops.delta("evicted", self.outbox.evicted)
        self._drops.delta("expired", self.outbox.expired)
        try:
            await self._serve(self.classifier, self.outbox)
        finally:
            await self.outbox.close()

    async def _serve(self, classifier: Classifier, outbox: Outbox) -> None:
        cfg = self.config
        dev = cfg.device
        self.window = Window(cfg.telemetry.max_features, time.time())
        escalations = Escalations(cfg.routing.max_outstanding)
        sampler = UncertaintySampler(
            cfg.sampling.entropy_threshold, cfg.sampling.margin_threshold, cfg.sampling.max_per_minute
        )
        # The pipeline resizes it to the batches it forms.
        queue = Intake(maxsize=intake_bound(cfg.model.max_batch, classifier.info.input_bytes))
        ids = InputIds()
        source = self._make_source(queue, ids)
        self._escalations = escalations
        self._mqtt_source = source if isinstance(source, MqttInputSource) else None
        self.link = link = Link(
            self._link_config(),
            outbox,
            will=lambda connection: self._status("offline", "connection_lost", connection),
            birth=lambda connection: self._status("online", "connected", connection),
            subscriptions=self._subscriptions(),
            on_message=self._on_message,
        )
        self._pipeline = pipeline = Pipeline(
            cfg, classifier, outbox, escalations, sampler, self._current_window, lambda: link.is_connected
        )
        assert self._boot is not None
        self.slots = slots = SlotManager(
            self._slot_store,
            self._boot,
            pipeline,
            CommandAcks(outbox, self.topics, dev.fleet_id, dev.device_id),
            self._load_model,
            InstallPolicy.from_config(cfg.ota),
            on_switch=self._model_switched,
        )
        if self.installer is None:
            self.installer = slots
        self.ota = build_agent(cfg, outbox, link, self.installer, self._model_files)
        probe = ResourceProbe()
        ctx = TelemetryContext(
            dev.fleet_id,
            dev.device_id,
            Providers(
                requested=list(classifier.providers.requested),
                active=list(classifier.providers.active),
                fallback=classifier.providers.fallback,
            ),
        )
        log.info(
            "edge node starting fleet=%s device=%s source=%s broker=%s:%d",
            dev.fleet_id,
            dev.device_id,
            describe(cfg.source),
            cfg.mqtt.host,
            cfg.mqtt.port,
        )
        if cfg.node.status_interval_s > 0:
            self.status = StatusLine(
                cfg.node.status_interval_s,
                outbox,
                lambda: link.is_connected,
                lambda: link.stats.published,
                self._current_window,
            )
        async with asyncio.TaskGroup() as tg:
            status_task = tg.create_task(self.status.run(), name="status") if self.status is not None else None
            link_task = tg.create_task(link.run(), name="link")
            pipe_task = tg.create_task(pipeline.run(queue), name="pipeline")
            tele_task = tg.create_task(self._telemetry_loop(ctx, probe, sampler), name="telemetry")
            src_task = tg.create_task(source.run(), name="source")
            ota_task = tg.create_task(self.ota.run(), name="ota")
            slots_task = tg.create_task(slots.run(), name="slots")
            self.ready.set()
            await self._stop.wait()
            log.info("stopping: draining queued inputs and outstanding escalations")
            src_task.cancel()
            ota_task.cancel()  # an unfinished download resumes from its bitmap on the next run
            await queue.join()
            await escalations.wait_idle()
            pipe_task.cancel()
            await slots.close()  # a clean stop does not count toward the crash-loop limit
            slots_task.cancel()
            tele_task.cancel()
            with suppress(asyncio.CancelledError):
                await tele_task
            await self._publish_window(ctx, probe, sampler)
            await outbox.put(self._status("offline", "shutdown"))
            await link.close(DRAIN_TIMEOUT_S)
            link_task.cancel()
            if status_task is not None:
                status_task.cancel()
        log.info("edge node stopped processed=%d outbox_depth=%d", pipeline.processed, outbox.depth)

    def _model_files(self) -> list[Path]:
        """The file of the model that runs now: the base a model patch is most likely made for."""
        return [self.classifier.info.path] if self.classifier is not None else []

    def _load_model(self, path: Path) -> Classifier:
        m = self.config.model
        return Classifier.load(path, m.providers, m.intra_op_threads)

    async def _model_switched(self, classifier: Classifier) -> None:
        """An OTA switch: status and telemetry name the new model from now on; the retained
        status is refreshed so the cloud sees the switch without waiting for a reconnect."""
        self.classifier = classifier
        assert self.outbox is not None
        try:
            await self.outbox.put(self._status("online", "connected"))
        except OutboxError as exc:
            self.stats.outbox_errors += 1
            log.error("status after the model switch not stored: %s", exc)

    def _current_window(self) -> Window:
        assert self.window is not None
        return self.window

    def _make_source(self, queue: Intake, ids: InputIds) -> Source:
        src = self.config.source
        if src.kind == "directory":
            assert src.path is not None
            return DirectorySource(queue, ids, src.path, src.poll_s)
        if src.kind == "replay":
            return ReplaySource(queue, ids, src)
        return MqttInputSource(queue, ids)

    def _link_config(self) -> LinkConfig:
        m = self.config.mqtt
        return LinkConfig(
            host=m.host,
            port=m.port,
            client_id=m.client_id or f"edge-{self.config.device.device_id}",
            username=m.username,
            password=m.password,
            tls_ca=m.tls_ca,
            tls_cert=m.tls_cert,
            tls_key=m.tls_key,
            keepalive=m.keepalive,
            protocol=m.protocol,
            session_expiry_s=m.session_expiry_s,
            reconnect_min_s=m.reconnect_min_s,
            reconnect_max_s=m.reconnect_max_s,
            inflight_window=m.inflight_window,
        )

    def _subscriptions(self) -> list[tuple[str, int]]:
        dev = self.config.device
        subs = [
            (self.topics.device(dev.fleet_id, dev.device_id, Channel.ESCALATE_REPLY), 1),
            (self.topics.device(dev.fleet_id, dev.device_id, Channel.CMD), 1),
        ]
        if self.config.source.kind == "mqtt":
            subs.append((self.topics.device(dev.fleet_id, dev.device_id, Channel.INPUT), 1))
        return subs

    def _status(
        self,
        state: Literal["online", "offline"],
        reason: Literal["connected", "shutdown", "connection_lost"],
        connection: int | None = None,
    ) -> OutMessage:
        """The retained status message; `connection` defaults to the link's current connection."""
        dev = self.config.device
        assert self.classifier is not None
        status = Status(
            msg_id=new_msg_id(),
            fleet_id=dev.fleet_id,
            device_id=dev.device_id,
            ts=time.time(),
            state=state,
            reason=reason,
            model=self.classifier.info.ref,
            providers=list(self.classifier.providers.active),
            software=__version__,
            started_at=self._started_at,
            connection=connection if connection is not None else (self.link.connection if self.link else None),
        )
        return OutMessage(
            topic=self.topics.device(dev.fleet_id, dev.device_id, Channel.STATUS),
            payload=encode(status),
            priority=Priority.CONTROL,
            msg_id=status.msg_id,
            retain=True,
        )

    # ---- inbound -----------------------------------------------------------------------------
    def _on_message(self, message: IncomingMessage) -> Awaitable[None] | None:
        try:
            parsed = self.topics.parse(message.topic)
            if isinstance(parsed, ModelTopic):
                if self.ota is not None:
                    self.ota.on_chunk(message)
                return None
            where = self.topics.parse_device(message.topic)
        except ValueError as exc:
            log.warning("message on unexpected topic=%s dropped: %s", message.topic, exc)
            return None
        if where.channel is Channel.ESCALATE_REPLY:
            try:
                reply = decode(message.payload, EscalationReply)
            except DecodeError as exc:
                log.warning("bad escalation reply topic=%s error=%s", message.topic, exc)
                return None
            if not self._escalations.resolve(reply):
                self.stats.late_replies += 1
        elif where.channel is Channel.INPUT and self._mqtt_source is not None:
            self._mqtt_source.offer(message.payload, message.topic)
        elif where.channel is Channel.CMD and self.ota is not None:
            # The link acks the MQTT message once this finished: a crash before leaves it redelivered.
            return self.ota.on_command(message)
        return None

    # ---- telemetry ---------------------------------------------------------------------------
    async def _telemetry_loop(self, ctx: TelemetryContext, probe: ResourceProbe, sampler: UncertaintySampler) -> None:
        interval = self.config.telemetry.interval_s
        loop = asyncio.get_running_loop()
        next_at = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += interval
            await self._publish_window(ctx, probe, sampler)

    async def _publish_window(self, ctx: TelemetryContext, probe: ResourceProbe, sampler: UncertaintySampler) -> None:
        assert self.window is not None and self.outbox is not None and self.classifier is not None
        window, now = self.window, time.time()
        self.window = Window(self.config.telemetry.max_features, now)
        if self.status is not None:
            self.status.closed(window)
        if self._mqtt_source is not None and self._mqtt_source.overloaded:
            window.rejected["overloaded"] += self._mqtt_source.overloaded
            self._mqtt_source.overloaded = 0
        outbox = self.outbox
        stats = OutboxStats(
            depth=outbox.depth,
            bytes=outbox.bytes,
            available=outbox.available,
            evicted=self._drops.delta("evicted", outbox.evicted),
            expired=self._drops.delta("expired", outbox.expired),
            write_errors=self._write_errors(),
        )
        message = build_telemetry(
            ctx,
            self.classifier.info.ref,
            window,
            seq=self._seq,
            now=now,
            samples=sampler.take_counts(),
            outbox=stats,
            resources=probe.read(),
        )
        self._seq += 1
        try:
            await outbox.put(
                OutMessage(
                    topic=self.topics.device(ctx.fleet_id, ctx.device_id, Channel.TELEMETRY),
                    payload=encode(message),
                    priority=Priority.TELEMETRY,
                    msg_id=message.msg_id,
                )
            )
        except OutboxError as exc:
            self.stats.outbox_errors += 1
            log.error("telemetry window %d not stored: %s", message.window_seq, exc)
        self.stats.windows += 1

    def _write_errors(self) -> int:
        """Outbox writes refused since the last window, by the pipeline and by telemetry itself."""
        pipeline = self._pipeline
        total = self.stats.outbox_errors + (pipeline.outbox_errors if pipeline is not None else 0)
        delta, self._write_errors_reported = total - self._write_errors_reported, total
        return delta


class _Deltas:
    """Turns the outbox's cumulative drop counters into per-window counts by class name."""

    def __init__(self) -> None:
        self._last: dict[str, dict[Priority, int]] = {}

    def delta(self, kind: str, totals: dict[Priority, int]) -> dict[str, int]:
        last = self._last.get(kind, {})
        self._last[kind] = dict(totals)
        out = {p.name.lower(): n - last.get(p, 0) for p, n in totals.items()}
        return {k: v for k, v in out.items() if v > 0}
