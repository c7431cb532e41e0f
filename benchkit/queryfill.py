"""Fill a registry with a fleet's last minutes as the bridge writes them (for bench/queries.py).

Each device's status and telemetry windows go through the bridge's own row-writing code
(cloud_bridge/ingest/rows.py `add_message`, `Registry.commit_batch`), so the rows, their JSON bodies
(~3 KB with the feature statistics) and their summary columns are what a running bridge stores. The
windows of one device share a template built by the fleet simulator (bench/fleetsim/device.py) and
differ in their counts, escalations and times: building every window afresh would make the fill, not
the queries, the bench's cost.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import numpy as np

from benchkit.typed import typed_devices
from cloud_bridge.ingest.rows import add_message
from cloud_bridge.registry import Batch, Registry
from schemas import ConfidenceStats, Envelope, EscalationCounts, ModelRef, new_msg_id
from schemas.topics import Topics

FLEET = "sim"
OLD_MODEL = ModelRef(name="digits-edge", version="1.0.0", sha256="ab" * 32)


@dataclass(frozen=True)
class FillSpec:
    devices: int
    minutes: float
    window_s: float = 10.0
    offline_share: float = 0.05
    seed: int = 7


def device_name(i: int) -> str:
    return f"sim-{i:06d}"


def fleet_messages(spec: FillSpec, now: float) -> Iterator[Envelope]:
    """Every device's status, then its telemetry windows over the last `minutes`, oldest first."""
    rng = np.random.default_rng(spec.seed)
    topics = Topics()
    windows = int(spec.minutes * 60 / spec.window_s)
    names = [device_name(i) for i in range(spec.devices)]
    online = (rng.random(spec.devices) >= spec.offline_share).tolist()
    for _, status, template in typed_devices(topics, FLEET, names, online, rng, now):
        yield status
        phase = float(rng.uniform(0, spec.window_s))  # devices' windows end at their own times
        counts = rng.poisson(spec.window_s, windows)
        sent = rng.binomial(counts, 0.05)
        confidence = rng.uniform(0.8, 0.95, windows)
        for k in range(windows):
            end = now - (windows - 1 - k) * spec.window_s - phase
            n, s = int(counts[k]), int(sent[k])
            yield msgspec.structs.replace(
                template,
                msg_id=new_msg_id(),
                ts=end,
                window_start=end - spec.window_s,
                window_end=end,
                window_seq=k,
                count=n,
                escalations=EscalationCounts(sent=s, answered=s, agreed=s - s // 4),
                confidence=ConfidenceStats(mean=float(confidence[k]), p05=0.5, min=0.4) if n else None,
            )


async def fill(registry: Registry, spec: FillSpec, now: float, batch_size: int = 2000) -> int:
    """Write the fleet's rows in batches of `batch_size` messages; returns how many messages."""
    batch, written = Batch(), 0
    for message in fleet_messages(spec, now):
        add_message(batch, None, message, time.time())
        written += 1
        if written % batch_size == 0:
            await registry.commit_batch(batch)
            batch = Batch()
    if batch.devices:
        await registry.commit_batch(batch)
    return written
