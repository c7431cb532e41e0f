"""Series for Grafana: line protocol formatted here (lines.py), written in batches to InfluxDB and
spilled to disk while it is down (writer.py).
"""

from cloud_bridge.tsdb.lines import (
    FieldValue,
    agreement_line,
    alert_line,
    drift_line,
    drift_line_for,
    drift_tags,
    escape_tag,
    format_field,
    line,
    status_line,
    tag_part,
    telemetry_lines,
)
from cloud_bridge.tsdb.writer import TsdbSettings, TsdbWriter

__all__ = [
    "FieldValue",
    "TsdbSettings",
    "TsdbWriter",
    "agreement_line",
    "alert_line",
    "drift_line",
    "drift_line_for",
    "drift_tags",
    "escape_tag",
    "format_field",
    "line",
    "status_line",
    "tag_part",
    "telemetry_lines",
]
