"""Alerts the cloud publishes about devices (drift, latency)."""

from __future__ import annotations

from typing import Literal

from schemas.messages.base import (
    Envelope,
    ModelRef,
    RefId,
    Text,
    Ts,
)


class Alert(Envelope, kw_only=True, tag="alert/1"):
    """A drift or latency alert about one device and model version, on {prefix}/{fleet}/alerts."""

    alert_id: RefId
    kind: Literal["prediction_drift", "confidence_drift", "feature_drift", "latency"]
    state: Literal["firing", "resolved"]
    model: ModelRef
    score: float
    threshold: float
    window_start: Ts
    window_end: Ts
    detail: Text = ""
