"""What the node says about itself: its retained status and one telemetry window every interval.

The status is a birth ("online") on every connect, a last will ("offline", sent by the broker when
the connection dies) and "offline"/"shutdown" when the node stops; each carries the connection's
number, so that consumers can order them, and the outbox's epoch, which confirmations name.

A telemetry window aggregates everything the pipeline did (edge_node/telemetry.py) with what the
uplink knows: the outbox's depth, drops by class and delivery state, write errors, and the clock
offset the clock exchange estimated.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from edge_node import __version__
from edge_node.config import EdgeConfig
from edge_node.errors import OutboxError
from edge_node.inference.model import Classifier
from edge_node.inference.shadow import ShadowRunner
from edge_node.routing.sampling import UncertaintySampler
from edge_node.telemetry import ResourceProbe, TelemetryContext, Window, build_telemetry
from edge_node.uplink.budget import Spend
from edge_node.uplink.clock import ClockSync
from edge_node.uplink.outbox import Outbox, OutMessage, Priority
from edge_node.uplink.wire import Wire
from schemas import Channel, OutboxStats, Status, encode, new_msg_id

log = logging.getLogger(__name__)


@dataclass
class NodeStats:
    """What the node did since it started (for logs, tests and the demo summary)."""

    windows: int = 0
    late_replies: int = 0
    outbox_errors: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class Counted(Protocol):
    """Counters the window reports as deltas: writes the pipeline's outbox refused."""

    @property
    def outbox_errors(self) -> int: ...

    @property
    def shadow(self) -> ShadowRunner:
        """A rollout's shadow model, whose window counts go into the telemetry's `shadow` field."""
        ...


class Reporter:
    """Builds the node's status messages and publishes its telemetry windows."""

    def __init__(
        self,
        config: EdgeConfig,
        wire: Wire,
        outbox: Outbox,
        clock: ClockSync,
        classifier: Callable[[], Classifier],
        stats: NodeStats,
    ) -> None:
        self.config = config
        self._wire = wire
        self._outbox = outbox
        self._clock = clock
        self._classifier = classifier
        self._stats = stats
        self._started_at = time.time()
        self._seq = 0
        self._drops = _Deltas()
        # Drop counters in the file are totals since it was created; telemetry reports this run's.
        self._drops.delta("evicted", outbox.evicted)
        self._drops.delta("expired", outbox.expired)
        self._delivery_reported = (0, 0)
        self._write_errors_reported = 0
        self.window = Window(config.telemetry.max_features, time.time())
        self._last_sent = 0.0  # unix time the last window was sent (none yet: the first goes at once)
        self.overloaded: Callable[[], int] = lambda: 0  # inputs a source dropped, since the last window
        self.closed: Callable[[Window], None] = lambda window: None  # told of each window it closes
        self.pipeline: Counted | None = None

    def current_window(self) -> Window:
        return self.window

    # ---- status --------------------------------------------------------------------------------

    def status(
        self,
        state: Literal["online", "offline"],
        reason: Literal["connected", "shutdown", "connection_lost"],
        connection: int | None,
    ) -> OutMessage:
        """The retained status message of connection number `connection`.

        The last will is published by the broker, never from the outbox: it carries no seq (the
        cloud must not confirm a row the outbox does not have); every other status is confirmed.
        """
        dev = self.config.device
        classifier = self._classifier()
        status = Status(
            msg_id=new_msg_id(),
            fleet_id=dev.fleet_id,
            device_id=dev.device_id,
            ts=time.time(),
            state=state,
            reason=reason,
            model=classifier.info.ref,
            providers=list(classifier.providers.active),
            software=__version__,
            started_at=self._started_at,
            connection=connection,
            outbox_epoch=self._outbox.epoch,
            accepts=self._wire.accepts,
        )
        if reason == "connection_lost":
            topic = self._wire.topic[Channel.STATUS]
            return OutMessage(topic, encode(status), Priority.CONTROL, status.msg_id, retain=True)
        return self._wire.out(Channel.STATUS, status, Priority.CONTROL, retain=True)

    # ---- telemetry -------------------------------------------------------------------------------

    async def run(self, ctx: TelemetryContext, probe: ResourceProbe, sampler: UncertaintySampler) -> None:
        """One window every `[telemetry] interval_s`, on a fixed schedule (no drift with load)."""
        interval = self.config.telemetry.interval_s
        loop = asyncio.get_running_loop()
        next_at = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += interval
            await self.publish_window(ctx, probe, sampler)

    async def publish_window(
        self, ctx: TelemetryContext, probe: ResourceProbe, sampler: UncertaintySampler, *, final: bool = False
    ) -> None:
        """Close the window into a telemetry message; unless `final`, a window the daily byte budget
        cannot pay for stays open and grows into the next one (its counts are not lost)."""
        budget = self._wire.budget
        overloaded = self.overloaded()
        if overloaded:
            self.window.rejected["overloaded"] += overloaded
        if not final and self._idle(self.window):
            return
        if not final and not budget.allows(Spend.TELEMETRY):
            budget.hold(Channel.TELEMETRY.value)
            return
        window, now = self.window, time.time()
        self.window = Window(self.config.telemetry.max_features, now)
        self._last_sent = now
        self.closed(window)
        message = build_telemetry(
            ctx,
            self._classifier().info.ref,
            window,
            seq=self._seq,
            now=now,
            samples=sampler.take_counts(),
            outbox=self._outbox_stats(),
            resources=probe.read(),
            link=budget.take(),
        )
        message.clock_offset_s = self._clock.offset_s
        if self.pipeline is not None:
            message.shadow = self.pipeline.shadow.take()
        self._seq += 1
        try:
            await self._outbox.put(self._wire.out(Channel.TELEMETRY, message, Priority.TELEMETRY))
        except OutboxError as exc:
            self._stats.outbox_errors += 1
            log.error("telemetry window %d not stored: %s", message.window_seq, exc)
        self._stats.windows += 1

    def _idle(self, window: Window) -> bool:
        """A window in which nothing happened waits to be sent until `[telemetry] idle_interval_s`
        passed since the last one: an idle device costs a window every few minutes, not every
        interval (the window then covers the whole quiet span; its counts are all zero)."""
        idle_s = self.config.telemetry.idle_interval_s
        if idle_s <= 0 or window.count or window.rejected or window.feature_n:
            return False
        return time.time() - self._last_sent < idle_s

    def _outbox_stats(self) -> OutboxStats:
        outbox = self._outbox
        delivery = outbox.delivery
        resent, confirmed = self._delivery_reported
        self._delivery_reported = (delivery.resent, delivery.confirmed)
        return OutboxStats(
            depth=outbox.depth,
            bytes=outbox.bytes,
            available=outbox.available,
            evicted=self._drops.delta("evicted", outbox.evicted),
            expired=self._drops.delta("expired", outbox.expired),
            write_errors=self._write_errors(),
            delivery=delivery.mode,
            unconfirmed=delivery.unconfirmed,
            resent=delivery.resent - resent,
            confirmed=delivery.confirmed - confirmed,
        )

    def _write_errors(self) -> int:
        """Outbox writes refused since the last window, by the pipeline and by telemetry itself."""
        pipeline = self.pipeline
        total = self._stats.outbox_errors + (pipeline.outbox_errors if pipeline is not None else 0)
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
