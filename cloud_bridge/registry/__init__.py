"""The registry database (SQLite for one bridge, PostgreSQL for several): devices,
results, samples, drift state, models, commands and rollouts.
"""

from cloud_bridge.registry.registry import Batch, DeviceDelta, Registry
from cloud_bridge.registry.tables import (
    Agreement,
    AlertRow,
    Base,
    CommandAckRow,
    CommandRow,
    DeadLetter,
    Device,
    DriftEpisodeRow,
    DriftStateRow,
    DriftWindowRow,
    ModelRow,
    ResultAggregate,
    ResultRow,
    RolloutDeviceRow,
    RolloutRow,
    SampleRow,
    SeenMessage,
    TelemetryRow,
)

__all__ = [
    "Agreement",
    "AlertRow",
    "Base",
    "Batch",
    "CommandAckRow",
    "CommandRow",
    "DeadLetter",
    "Device",
    "DeviceDelta",
    "DriftEpisodeRow",
    "DriftStateRow",
    "DriftWindowRow",
    "ModelRow",
    "Registry",
    "ResultAggregate",
    "ResultRow",
    "RolloutDeviceRow",
    "RolloutRow",
    "SampleRow",
    "SeenMessage",
    "TelemetryRow",
]
