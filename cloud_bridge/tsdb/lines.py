"""InfluxDB line protocol for what the bridge stores as series, formatted by hand.

One tag vocabulary for every measurement: `fleet`, `device`, `model` (name) and `version` (model
version), plus `class` (class_counts), `metric` (drift), `kind` (alert), `rollout` and `stage`
(rollout, whose lines cloud_bridge/rollout/driver.py formats with `line`).

Why by hand: influxdb-client spends its time building `Point` objects (docs/traps.md #5); formatting
strings is 6-8x faster. A point's timestamp is the telemetry `window_end` (ms), so a replayed message
rewrites the same point instead of adding one.
"""

from __future__ import annotations

import functools
import re

from schemas.messages import Alert, Telemetry

_MEASUREMENT_ESC = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\\": "\\\\"})
_TAG_ESC = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\\": "\\\\"})
_STR_ESC = str.maketrans({'"': r"\"", "\\": "\\\\"})
# Ids and model names almost never need escaping: one regex scan is ~3x cheaper than translate.
_TAG_SPECIAL = re.compile(r"[,= \n\\]").search

FieldValue = float | int | bool | str


def escape_tag(value: str) -> str:
    """Escape a tag key, tag value or field key (commas, equals signs, spaces, backslashes)."""
    return value if _TAG_SPECIAL(value) is None else value.translate(_TAG_ESC)


def format_field(value: FieldValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return repr(value)
    return '"' + value.translate(_STR_ESC) + '"'


def tag_part(tags: dict[str, str]) -> str:
    """`,k=v` for every non-empty tag, sorted by key (InfluxDB's preferred order), escaped."""
    return "".join(f",{escape_tag(k)}={escape_tag(v)}" for k, v in sorted(tags.items()) if v != "")


@functools.lru_cache(maxsize=16_384)
def device_tags(fleet: str, device: str, model: str, version: str) -> str:
    """The tag part of a device's points (escaped and sorted once per device and model, not per
    message: at 10,000 devices this formatting was a tenth of the bridge's event-loop time)."""
    return tag_part({"fleet": fleet, "device": device, "model": model, "version": version})


def line(measurement: str, tags: dict[str, str], fields: dict[str, FieldValue], ts_ms: int) -> str:
    """One line of InfluxDB line protocol; tags sorted (InfluxDB's preferred order), empty tags skipped."""
    field_part = ",".join(f"{escape_tag(k)}={format_field(v)}" for k, v in fields.items())
    return f"{measurement.translate(_MEASUREMENT_ESC)}{tag_part(tags)} {field_part} {ts_ms}"


def telemetry_lines(message: Telemetry) -> list[str]:
    """The points of one telemetry window: inference, class_counts (one per class) and device_status.

    The hot path of ingestion (a dozen lines per window): the tags are escaped and sorted once per
    message and the field keys are constant identifiers, so only values are formatted here.
    """
    tags = device_tags(message.fleet_id, message.device_id, message.model.name, message.model.version)
    ts = f" {round(message.window_end * 1000)}"
    fields: list[str] = [f"count={format_field(message.count)}", f"rejected={format_field(message.rejected)}"]
    for prefix, lat in (("latency", message.latency_ms), ("edge_latency", message.edge_latency_ms)):
        if lat is not None:
            fields += [
                f"{prefix}_p50={format_field(lat.p50)}",
                f"{prefix}_p95={format_field(lat.p95)}",
                f"{prefix}_p99={format_field(lat.p99)}",
                f"{prefix}_max={format_field(lat.max)}",
            ]
    if message.confidence is not None:
        conf = message.confidence
        fields += [f"confidence_mean={format_field(conf.mean)}", f"confidence_p05={format_field(conf.p05)}"]
    if message.entropy is not None:
        fields.append(f"entropy_mean={format_field(message.entropy.mean)}")
    esc, smp, box = message.escalations, message.samples, message.outbox
    fields += [
        f"escalations_sent={format_field(esc.sent)}",
        f"escalations_answered={format_field(esc.answered)}",
        f"escalations_timed_out={format_field(esc.timed_out)}",
        f"escalations_fallback={format_field(esc.offline_fallback)}",
        f"escalations_over_budget={format_field(esc.over_budget)}",
        f"escalations_paused={format_field(esc.paused)}",
        f"samples_sent={format_field(smp.sent)}",
        f"samples_skipped={format_field(smp.skipped_budget)}",
        f"outbox_depth={format_field(box.depth)}",
        f"outbox_bytes={format_field(box.bytes)}",
        f"outbox_evicted={format_field(sum(box.evicted.values()))}",
    ]
    if message.resources is not None:
        fields += [
            f"cpu={format_field(message.resources.cpu_percent)}",
            f"rss={format_field(message.resources.rss_mb)}",
        ]
    if message.providers is not None:
        fields.append(f"provider_fallback={format_field(int(message.providers.fallback))}")
    link = message.link
    if link is not None:
        fields += [
            f"link_up={format_field(sum(link.up.values()))}",
            f"link_down={format_field(sum(link.down.values()))}",
        ]
        if link.budget_left is not None:
            fields.append(f"budget_left={format_field(link.budget_left)}")
    out = [f"inference{tags} {','.join(fields)}{ts}"]
    if link is not None:
        # One point per channel (tag "channel" sorts first): bytes up and down, and what the daily
        # budget held back, so a panel can stack what each channel costs.
        for channel in sorted(link.up.keys() | link.down.keys() | link.held.keys()):
            values = (("up", link.up), ("down", link.down), ("held", link.held))
            cf = ",".join(f"{name}={format_field(counts.get(channel, 0))}" for name, counts in values)
            out.append(f"link,channel={escape_tag(channel)}{tags} {cf}{ts}")
    # "class" sorts before every other tag key, so it goes first.
    out.extend(
        f"class_counts{_class_tag(c)}{tags} count={format_field(n)}{ts}" for c, n in message.class_counts.items()
    )
    out.append(f"device_status{tags} online=1i{ts}")
    if message.shadow is not None:
        out.append(shadow_line(message, ts))
    return out


def shadow_line(message: Telemetry, ts: str) -> str:
    """A rollout's shadow model on this device over the window (tags: the shadow model; `active`:
    the active model's version), its counts as schemas ShadowStats names them."""
    shadow = message.shadow
    assert shadow is not None
    tags = tag_part(
        {
            "fleet": message.fleet_id,
            "device": message.device_id,
            "model": shadow.model.name,
            "version": shadow.model.version,
            "active": message.model.version,
        }
    )
    counts = (
        *("inputs", "skipped", "errors", "agreed", "labeled", "correct", "active_correct"),
        *("cloud_answered", "cloud_agreed", "active_cloud_agreed"),
    )
    fields = [f"{name}={format_field(getattr(shadow, name))}" for name in counts]
    if shadow.confidence_mean is not None:
        fields.append(f"confidence_mean={format_field(shadow.confidence_mean)}")
    if shadow.latency_p95_ms is not None:
        fields.append(f"latency_p95_ms={format_field(shadow.latency_p95_ms)}")
    return f"shadow{tags} {','.join(fields)}{ts}"


def _class_tag(label: str) -> str:
    return f",class={escape_tag(label)}" if label else ""


def status_line(fleet_id: str, device_id: str, online: bool, ts: float, model: str = "", version: str = "") -> str:
    tags = device_tags(fleet_id, device_id, model, version)
    return f"device_status{tags} online={int(online)}i {round(ts * 1000)}"


def agreement_line(fleet_id: str, device_id: str, version: str, agreed: int, answered: int, ts: float) -> str:
    tags = {"fleet": fleet_id, "device": device_id, "version": version}
    # agreed and answered too, so a dashboard can sum both over any interval: a mean of ratios would
    # weigh a flush with 1 answer like one with 1,000.
    fields: dict[str, FieldValue] = {
        "agreement": agreed / answered if answered else 0.0,
        "agreed": agreed,
        "answered": answered,
    }
    return line("escalation", tags, fields, round(ts * 1000))


def drift_line(
    fleet_id: str,
    device_id: str,
    model: str,
    version: str,
    metric: str,
    score: float,
    threshold: float,
    firing: bool,
    ts: float,
) -> str:
    """One drift evaluation: `metric` is the kind (prediction_drift, ...), at the evaluated window's end."""
    return drift_line_for(drift_tags(fleet_id, device_id, model, version), metric, score, threshold, firing, ts)


def drift_tags(fleet_id: str, device_id: str, model: str, version: str) -> tuple[str, str]:
    """The escaped tags of one (device, model version)'s drift lines, before and after `metric`
    (which sorts between them): every evaluation writes one line per kind with the same tags."""
    return tag_part({"fleet": fleet_id, "device": device_id}), tag_part({"model": model, "version": version})


# The drift kinds' metric tags, escaped once (a drift line per kind per scored window).
_METRIC_TAGS = {k: f",metric={k}" for k in ("prediction_drift", "confidence_drift", "feature_drift", "latency")}


def drift_line_for(tags: tuple[str, str], metric: str, score: float, threshold: float, firing: bool, ts: float) -> str:
    """`drift_line` with the tags from `drift_tags` (same output as `line`)."""
    head, tail = tags
    metric_tag = _METRIC_TAGS.get(metric)
    if metric_tag is None:
        metric_tag = f",metric={escape_tag(metric)}" if metric else ""
    fields = f"score={float(score)!r},threshold={float(threshold)!r},firing={int(firing)}i"
    return f"drift{head}{metric_tag}{tail} {fields} {round(ts * 1000)}"


def alert_line(alert: Alert) -> str:
    """An alert transition, for Grafana annotations (state "firing" or "resolved")."""
    tags = {
        "fleet": alert.fleet_id,
        "device": alert.device_id,
        "model": alert.model.name,
        "version": alert.model.version,
        "kind": alert.kind,
    }
    fields: dict[str, FieldValue] = {
        "state": alert.state,
        "score": float(alert.score),
        "threshold": float(alert.threshold),
        "detail": alert.detail,
    }
    return line("alert", tags, fields, round(alert.window_end * 1000))
