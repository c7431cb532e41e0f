"""The registry database (SQLite for one bridge, PostgreSQL for several): devices,
results, samples, drift state, models, commands and rollouts.
"""

from cloud_bridge.registry.loop_tables import (
    DatasetItemRow,
    DatasetVersionRow,
    ImproveLoopRow,
    LabelImportRow,
    LabelRow,
    ModelLineageRow,
)
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
    ModelRow,
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
    "DatasetItemRow",
    "DatasetVersionRow",
    "DeadLetter",
    "Device",
    "DeviceDelta",
    "DriftEpisodeRow",
    "DriftStateRow",
    "ImproveLoopRow",
    "LabelImportRow",
    "LabelRow",
    "ModelLineageRow",
    "ModelRow",
    "Registry",
    "ResultRow",
    "RolloutDeviceRow",
    "RolloutRow",
    "SampleRow",
    "SeenMessage",
    "TelemetryRow",
]
