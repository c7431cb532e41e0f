"""What ingestion admits: the topic filters it subscribes to, and the msg_ids it stored recently.

The cache drops most redeliveries before they cost a transaction; the registry's unique msg_id,
checked inside the batch's transaction (`Batch.narrow`), is the backstop.
"""

from __future__ import annotations

from collections import OrderedDict

from schemas.topics import Channel, Topics

INGEST_CHANNELS = (Channel.STATUS, Channel.TELEMETRY, Channel.SAMPLES, Channel.RESULTS, Channel.CMD_ACK)


def ingest_filters(topics: Topics, share_group: str, shared: bool) -> list[str]:
    """The subscription filters of ingestion (shared among bridges when `shared`).

    Status is never shared: brokers do not deliver retained messages to shared subscriptions
    (MQTT 5 spec 4.8.2), so a bridge started after the devices would never learn who is online.
    Every bridge takes every status message instead; they are few, and the msg_id dedup makes
    the copies harmless.
    """
    filters = [topics.filter(ch) for ch in INGEST_CHANNELS] + [topics.alerts_filter()]
    status = topics.filter(Channel.STATUS)
    return [Topics.shared(share_group, f) if shared and f != status else f for f in filters]


class RecentIds:
    """A bounded set of recently committed msg_ids (the registry's unique key is the backstop)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._ids

    def add(self, msg_id: str) -> None:
        self._ids[msg_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
