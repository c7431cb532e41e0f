"""Series for Grafana: line protocol formatted here (lines.py) and written in batches to InfluxDB's
1.x or v2 API (writer.py, api.py, transport.py), spilled to a bounded disk queue while it is down (spill.py).
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
