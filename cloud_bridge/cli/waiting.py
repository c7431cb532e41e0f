"""Why `cloud-bridge cmd` may be waiting: what the registry says about the device and the bridges.

A command is a QoS 1 message the broker keeps for an offline device, and a model update also needs
a running bridge to serve the chunks the device asks for: both make `cmd` wait with nothing to
show. When no ack has come for a few seconds, `Waiting` says which is likely, from the registry:
the device's online state and last-seen time (its status messages), and how long ago any bridge
stored a message (the newest `seen_messages` row: bridges store every message they take).
"""

from __future__ import annotations

import asyncio
import sys
import time

from sqlalchemy import func, select

from cloud_bridge.registry import Device, Registry, SeenMessage

HINT_AFTER_S = 5.0
# A bridge that stored nothing for this long is probably not running (devices send telemetry
# every few seconds).
BRIDGE_QUIET_S = 60.0


def _ago(seconds: float) -> str:
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


class Waiting:
    """Explains a silent wait for one command's acks (printed on stderr, once per ack state)."""

    def __init__(self, registry: Registry, fleet_id: str, device_id: str, action: str) -> None:
        self._registry = registry
        self._fleet_id = fleet_id
        self._device_id = device_id
        self._action = action
        self._told: set[str | None] = set()

    async def explain_after(self, delay_s: float, state: str | None) -> None:
        """After `delay_s` without a new ack (the caller cancels this on one), print why."""
        await asyncio.sleep(delay_s)
        if state in self._told:
            return
        self._told.add(state)
        text = await self.reason(state, time.time())
        print(f"cloud-bridge cmd {self._action}: still waiting: {text}", file=sys.stderr, flush=True)

    async def reason(self, state: str | None, now: float) -> str:
        """Why no (further) ack came, the last one being `state` (None: none yet)."""
        device = f"{self._fleet_id}/{self._device_id}"
        async with self._registry.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(Device.online, Device.last_seen).where(
                        Device.fleet_id == self._fleet_id, Device.device_id == self._device_id
                    )
                )
            ).first()
            newest = (await conn.execute(select(func.max(SeenMessage.received_at)))).scalar()
        bridge = self._bridge(newest, now)
        if state is None:
            if row is None:
                return (
                    f"the registry has never heard of {device}: check --device, and that a cloud-bridge with "
                    f"this registry runs ({bridge})"
                )
            seen = f"last seen {_ago(max(0.0, now - row.last_seen))} ago"
            if not row.online:
                return (
                    f"{device} is offline per the registry ({seen}): the broker keeps the command until it "
                    "reconnects (within the command's expiry)"
                )
            return (
                f"no ack from {device}, online per the registry ({seen}): is its edge-node running, subscribed "
                f"with this fleet's topic prefix, and does it trust this bridge's key? ({bridge})"
            )
        if self._action == "update" and state in ("received", "downloading"):
            return f"{device} is waiting for model chunks, which a running cloud-bridge serves: {bridge}"
        return f"{device} is {state}; the next ack comes when that step ends"

    @staticmethod
    def _bridge(newest: float | None, now: float) -> str:
        if newest is None:
            return "no bridge has stored any message in this registry: is a cloud-bridge running?"
        quiet = now - float(newest)
        if quiet > BRIDGE_QUIET_S:
            return f"no bridge has stored a message for {_ago(quiet)}: is a cloud-bridge running?"
        return f"a bridge stored a message {_ago(max(0.0, quiet))} ago"
