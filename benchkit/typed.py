"""Typed status and telemetry messages of simulated devices, for benches that fill a registry or a
TSDB directly (bench/queries.py, bench/dashboard.py) rather than over MQTT.

The fleet simulator (fleetsim) builds wire frames, not typed messages; decoding its frames with the
bridge's own decoder gives exactly the messages a bridge would store, with the simulator's
per-device variation (class mix, feature statistics).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from fleetsim.device import Device, Population
from fleetsim.profile import Profile
from schemas import Status, Telemetry
from schemas.codec import decode_for_topic
from schemas.topics import Channel, Topics

# An outbox epoch (hex, as the edge writes it).
_EPOCH = "be0c4"


def typed_devices(
    topics: Topics, fleet: str, names: Sequence[str], online: Sequence[bool], rng: np.random.Generator, now: float
) -> Iterator[tuple[Device, Status, Telemetry]]:
    """Each device with its status and a telemetry window of 10 inferences ending at `now`."""
    population = Population(len(names), Profile(), rng, now - 10.0)
    population.classes[:] = rng.multinomial(10, population.mix)
    population.paths[:, 0] = 10
    windows = population.close_windows(np.arange(len(names)), now, rng)
    for index, (name, up, (counts, mean, std)) in enumerate(zip(names, online, windows, strict=True)):
        device = Device(topics, fleet, name, index, _EPOCH)
        status = decode_for_topic(topics, device.topic[Channel.STATUS], device.status(now, up, False))
        window = decode_for_topic(
            topics, device.topic[Channel.TELEMETRY], device.telemetry(now, counts, mean, std, False)
        )
        assert isinstance(status, Status) and isinstance(window, Telemetry)
        yield device, status, window
