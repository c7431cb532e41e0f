"""Delivery confirmations: each device learns which of its messages a bridge has durably stored.

A device keeps every message it wants confirmed (those with a `seq`) until a confirm/1 names it,
so that a broker losing what it acknowledged (a restart that forgets a shared subscription, a
gateway's full queue) loses nothing. After each batch's transaction commits, ingestion hands the
seqs it stored here: new messages, duplicates of stored ones (the device sent again because a
confirmation was lost or late) and dead letters (stored too, and sending them again would not make
them valid). Every `interval_s` one confirm/1 per device goes out QoS 1 on the device's confirm
topic, the seqs folded into ranges, with a message expiry so a confirmation nobody fetched for a
day does not linger in a session. With several bridges each confirms what it stored.

A confirmation names the device's outbox by its epoch, which every status/1 carries (status is
subscribed unshared and retained, so every bridge learns every device's epoch, after a restart
too). Seqs of a device whose epoch is not known yet wait a few rounds, then are dropped: the device
sends those messages again and they are confirmed then. Memory is bounded: the epochs of at most
`max_devices` devices (least recently seen first out) and at most MAX_PENDING seqs per device.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson

from cloud_bridge.errors import MqttError
from schemas.codec import encode
from schemas.compact import ENCODING, encode_compact
from schemas.messages import Confirm
from schemas.msgid import new_msg_id
from schemas.topics import Channel, Topics

log = logging.getLogger(__name__)

# Confirmations awaiting their PUBACKs at once (they share the bridge's [mqtt] publish_window with
# escalation replies: a flush must not take all of it).
_IN_FLIGHT = 64

Key = tuple[str, str]  # (fleet_id, device_id)
Publish = Callable[[str, bytes, int, int | None], Awaitable[None]]  # topic, payload, qos, expiry s

MAX_PENDING = 65_536  # seqs held per device between rounds; more waits for the device to resend
MAX_RANGES = 4096  # the schema's bound per message; more ranges go in further messages
_HOLD_ROUNDS = 5  # rounds a device's seqs wait for its epoch
EXPIRY_S = 86_400


@dataclass
class ConfirmStats:
    messages: int = 0  # confirm/1 published
    seqs: int = 0  # seqs confirmed
    no_epoch: int = 0  # seqs dropped because the device's epoch stayed unknown
    failed: int = 0  # publishes that failed (the device sends those messages again)


def seq_of(payload: bytes | bytearray) -> int | None:
    """The `seq` of a payload that failed validation, if it is still a JSON object that names one."""
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    seq = body.get("seq") if isinstance(body, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 < seq < 1 << 63 else None


def ranges_of(seqs: list[int]) -> list[list[int]]:
    """Sorted, merged inclusive ranges: [5, 1, 2, 3, 9] -> [[1, 3], [5, 5], [9, 9]]."""
    out: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if out and seq == out[-1][1] + 1:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return out


class Confirmer:
    """Collects stored seqs per device and publishes them as confirm/1 every `interval_s`."""

    def __init__(self, topics: Topics, publish: Publish, interval_s: float, max_devices: int = 200_000) -> None:
        self._topics = topics
        self._publish = publish
        self._interval_s = interval_s
        self._max_devices = max_devices
        # -> (status order, epoch, whether the device reads the compact encoding)
        self._epochs: OrderedDict[Key, tuple[int, str, bool]] = OrderedDict()
        self._pending: dict[Key, list[int]] = {}
        self._waiting: dict[Key, int] = {}  # rounds a device's seqs waited for its epoch
        self.stats = ConfirmStats()

    def status(self) -> str:
        st = self.stats
        return f"confirms={st.messages} confirmed_seqs={st.seqs} confirms_failed={st.failed} no_epoch={st.no_epoch}"

    def epoch_seen(self, key: Key, epoch: str, order: int | None, accepts: list[str] | None = None) -> None:
        """A status/1 named the device's outbox (and what it reads); a later connection's status
        wins over an earlier one."""
        known = self._epochs.get(key)
        rank = order if order is not None else -1
        if known is not None and rank < known[0] and known[1] != epoch:
            return  # an older status (a retained copy, another bridge's late commit)
        self._epochs[key] = (max(rank, known[0] if known else -1), epoch, ENCODING in (accepts or ()))
        self._epochs.move_to_end(key)
        while len(self._epochs) > self._max_devices:
            self._epochs.popitem(last=False)

    def stored(self, key: Key, seqs: list[int]) -> None:
        """Seqs of `key`'s messages that are durably stored (called after the commit)."""
        pending = self._pending.setdefault(key, [])
        room = MAX_PENDING - len(pending)
        pending.extend(seqs[:room] if room < len(seqs) else seqs)

    @property
    def devices_pending(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.flush()

    async def flush(self) -> None:
        """Publish what is pending now (also called at shutdown, after ingestion drained): up to
        `_IN_FLIGHT` confirmations await their PUBACKs at once. One at a time, a round trip each,
        10,000 devices took longer than the interval on a loaded bridge."""
        pending, self._pending = self._pending, {}
        sends: list[Awaitable[None]] = []
        for key, seqs in pending.items():
            known = self._epochs.get(key)
            if known is None:
                rounds = self._waiting.get(key, 0) + 1
                if rounds < _HOLD_ROUNDS:
                    self._waiting[key] = rounds
                    self.stored(key, seqs)
                else:
                    self._waiting.pop(key, None)
                    self.stats.no_epoch += len(seqs)
                    log.warning(
                        "confirmations dropped device=%s/%s seqs=%d: no status names its outbox epoch", *key, len(seqs)
                    )
                continue
            self._waiting.pop(key, None)
            sends.append(self._send(key, known[1], ranges_of(seqs), known[2]))
            if len(sends) >= _IN_FLIGHT:
                await asyncio.gather(*sends)
                sends = []
        await asyncio.gather(*sends)

    async def _send(self, key: Key, epoch: str, ranges: list[list[int]], compact: bool) -> None:
        fleet_id, device_id = key
        topic = self._topics.device(fleet_id, device_id, Channel.CONFIRM)
        for start in range(0, len(ranges), MAX_RANGES):
            part = ranges[start : start + MAX_RANGES]
            message = Confirm(
                msg_id=new_msg_id(), fleet_id=fleet_id, device_id=device_id, ts=time.time(), epoch=epoch, ranges=part
            )
            try:
                payload = encode_compact(message) if compact else encode(message)
                await self._publish(topic, payload, 1, EXPIRY_S)
            except MqttError as exc:  # not connected, or refused: the device sends those messages again
                self.stats.failed += 1
                log.warning("confirmation not published device=%s/%s error=%s", fleet_id, device_id, exc)
                continue
            self.stats.messages += 1
            self.stats.seqs += sum(last - first + 1 for first, last in part)
