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
from pathlib import Path

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
from edge_node.ota.shadow import ShadowControl
from edge_node.ota.slots import SlotStore
from edge_node.reporting import NodeStats, Reporter
from edge_node.routing.escalation import Escalations
from edge_node.routing.sampling import UncertaintySampler
from edge_node.status import StatusLine
from edge_node.telemetry import ResourceProbe, TelemetryContext, Window
from edge_node.uplink.budget import ByteBudget
from edge_node.uplink.clock import RETRY_S as CLOCK_RETRY_S
from edge_node.uplink.clock import ClockSync
from edge_node.uplink.link import IncomingMessage, Link, LinkConfig
from edge_node.uplink.outbox import Outbox
from edge_node.uplink.outbox.sent import Confirming
from edge_node.uplink.wire import Wire, device_wire
from schemas import Channel, ClockReply, Confirm, DecodeError, EscalationReply, ModelTopic, Providers, decode

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 5.0


class EdgeNode:
    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.topics = config.topics
        self.stats = NodeStats()
        self._stop = asyncio.Event()
        self.classifier: Classifier | None = None
        self.outbox: Outbox | None = None
        self.link: Link | None = None
        self.reporter: Reporter | None = None
        self.status: StatusLine | None = None
        self.clock: ClockSync | None = None
        self._wire: Wire | None = None
        self.ready = asyncio.Event()
        self._pipeline: Pipeline | None = None
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
        ob = cfg.outbox
        confirming = Confirming(ob.confirm_window, ob.confirm_timeout_s, ob.confirm_timeout_max_s)
        self.outbox = await Outbox.open(
            ob.path,
            ob.max_bytes,
            synchronous=ob.synchronous,
            confirming=confirming if ob.delivery == "confirmed" else None,
        )
        try:
            await self._serve(self.classifier, self.outbox)
        finally:
            await self.outbox.close()

    async def _serve(self, classifier: Classifier, outbox: Outbox) -> None:
        cfg = self.config
        dev = cfg.device
        # The link's byte counts and the daily budget: the wire's producers ask it, the link pays it.
        budget = ByteBudget(cfg.uplink.daily_bytes, pending=lambda: outbox.bytes)
        self._wire = wire = device_wire(cfg, outbox, budget)
        self.clock = clock = ClockSync(wire, dev.fleet_id, dev.device_id)
        self.reporter = reporter = Reporter(cfg, wire, outbox, clock, self._classifier, self.stats)
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
        if self._mqtt_source is not None:
            reporter.overloaded = self._mqtt_source.take_overloaded
        self.link = link = Link(
            self._link_config(),
            outbox,
            will=lambda connection: reporter.status("offline", "connection_lost", connection),
            birth=lambda connection: reporter.status("online", "connected", connection),
            subscriptions=self._subscriptions(),
            on_message=self._on_message,
            on_connected=self._ask_the_time,
            meter=budget,
        )
        self._pipeline = pipeline = Pipeline(
            cfg, classifier, outbox, escalations, sampler, reporter.current_window, lambda: link.is_connected, wire
        )
        reporter.pipeline = pipeline
        if cfg.node.status_interval_s > 0:
            self.status = StatusLine(
                cfg.node.status_interval_s,
                outbox,
                lambda: link.is_connected,
                lambda: link.stats.published,
                reporter.current_window,
                link_bytes=lambda: (sum(budget.up.values()), sum(budget.down.values())),
            )
            reporter.closed = self.status.closed
        assert self._boot is not None
        self.slots = slots = SlotManager(
            self._slot_store,
            self._boot,
            pipeline,
            CommandAcks(outbox, wire, dev.fleet_id, dev.device_id),
            self._load_model,
            InstallPolicy.from_config(cfg.ota),
            on_switch=self._model_switched,
        )
        if self.installer is None:
            self.installer = slots
        acks = CommandAcks(outbox, wire, dev.fleet_id, dev.device_id)
        shadow = ShadowControl(pipeline.shadow, self._load_model, acks)
        self.ota = build_agent(cfg, outbox, acks, link, self.installer, self._model_files, shadow)
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
        async with asyncio.TaskGroup() as tg:
            status_task = tg.create_task(self.status.run(), name="status") if self.status is not None else None
            link_task = tg.create_task(link.run(), name="link")
            pipe_task = tg.create_task(pipeline.run(queue), name="pipeline")
            tele_task = tg.create_task(reporter.run(ctx, probe, sampler), name="telemetry")
            clock_task = tg.create_task(self._clock_loop(), name="clock")
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
            await pipeline.flush_results()
            pipe_task.cancel()
            await slots.close()  # a clean stop does not count toward the crash-loop limit
            slots_task.cancel()
            tele_task.cancel()
            clock_task.cancel()
            with suppress(asyncio.CancelledError):
                await tele_task
            await reporter.publish_window(ctx, probe, sampler, final=True)
            await outbox.put(reporter.status("offline", "shutdown", link.connection or None))
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
            assert self.reporter is not None and self.link is not None
            await self.outbox.put(self.reporter.status("online", "connected", self.link.connection or None))
        except OutboxError as exc:
            self.stats.outbox_errors += 1
            log.error("status after the model switch not stored: %s", exc)

    def _classifier(self) -> Classifier:
        assert self.classifier is not None
        return self.classifier

    @property
    def window(self) -> Window | None:
        """The telemetry window being filled now."""
        return self.reporter.window if self.reporter is not None else None

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
            topic_aliases=m.topic_aliases,
        )

    def _subscriptions(self) -> list[tuple[str, int]]:
        dev = self.config.device
        subs = [
            (self.topics.device(dev.fleet_id, dev.device_id, channel), 1)
            for channel in (Channel.ESCALATE_REPLY, Channel.CMD, Channel.CONFIRM, Channel.CLOCK_REPLY)
        ]
        if self.config.source.kind == "mqtt":
            subs.append((self.topics.device(dev.fleet_id, dev.device_id, Channel.INPUT), 1))
        return subs

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
        elif where.channel is Channel.CONFIRM:
            self._confirmed(message.payload)
        elif where.channel is Channel.CLOCK_REPLY:
            self._clock_reply(message.payload)
        elif where.channel is Channel.INPUT and self._mqtt_source is not None:
            self._mqtt_source.offer(message.payload, message.topic)
        elif where.channel is Channel.CMD and self.ota is not None:
            # The link acks the MQTT message once this finished: a crash before leaves it redelivered.
            return self.ota.on_command(message)
        return None

    def _clock_reply(self, payload: bytes) -> None:
        """The cloud's time, and which encodings it reads (the wire may switch to compact)."""
        try:
            reply = decode(payload, ClockReply)
        except DecodeError as exc:
            log.warning("bad clock reply dropped: %s", exc)
            return
        if self.clock is not None and self.clock.on_reply(reply, received=time.time()) and self._wire is not None:
            self._wire.cloud_reads(reply.accepts)

    def _confirmed(self, payload: bytes) -> None:
        """A cloud bridge stored these messages: they leave the outbox."""
        try:
            confirm = decode(payload, Confirm)
        except DecodeError as exc:
            log.warning("bad confirmation dropped: %s", exc)
            return
        if self.outbox is not None:
            self.outbox.confirm(confirm.epoch, [(first, last) for first, last in confirm.ranges])

    # ---- clock ---------------------------------------------------------------------------------
    async def _ask_the_time(self) -> None:
        """On every connect: a clock exchange with the cloud (the offset goes into telemetry)."""
        if self.clock is not None and self.outbox is not None:
            try:
                await self.outbox.put(self.clock.request())
            except OutboxError as exc:
                log.warning("clock request not stored: %s", exc)

    async def _clock_loop(self) -> None:
        while True:
            await asyncio.sleep(CLOCK_RETRY_S)
            if self.clock is not None and self.clock.due() and self.link is not None and self.link.is_connected:
                await self._ask_the_time()
