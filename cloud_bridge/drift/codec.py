"""The stored forms of drift state (JSON columns and text of the registry's `drift_states` rows).

Windows and pools become JSON with their feature vectors as base64 of little-endian float64;
`WindowCodec` keeps each stored window's decoded form and text, since a window is read and rewritten
with every later batch of its device while it is among the newest.
"""

from __future__ import annotations

import base64
import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from cloud_bridge.drift.windows import Floats, Pool, WindowStats

SCORE_LIMIT = 1e12  # alerts carry finite numbers only (JSON has no infinity)
# About 2 KB each with 64 pooled features: ~40 MB for the recent windows of a few thousand devices.
_CODEC_CACHE = 20_000


def _floats_or_none(values: Any) -> Floats | None:
    if values is None:
        return None
    if isinstance(values, str):
        return np.frombuffer(base64.b64decode(values), dtype="<f8").astype(np.float64)
    return np.asarray(values, dtype=np.float64)


def _list_or_none(values: Floats | None) -> str | None:
    # base64 of little-endian float64: decoding 256 floats this way is ~50x cheaper than a JSON list,
    # and float64 keeps stored windows bit-identical to what an in-memory detector computes with.
    return None if values is None else base64.b64encode(np.asarray(values, dtype="<f8").tobytes()).decode("ascii")


def window_to_json(w: WindowStats) -> dict[str, Any]:
    return {
        "classes": dict(w.classes),
        "confidence": w.confidence,
        "latency_p95": w.latency_p95,
        "feature_n": w.feature_n,
        "feature_mean": _list_or_none(w.feature_mean),
        "feature_std": _list_or_none(w.feature_std),
    }


def window_from_json(window_start: float, window_end: float, count: int, data: Mapping[str, Any]) -> WindowStats:
    return WindowStats(
        window_start=window_start,
        window_end=window_end,
        count=count,
        classes=data.get("classes") or {},
        confidence=data.get("confidence"),
        latency_p95=data.get("latency_p95"),
        feature_n=int(data.get("feature_n") or 0),
        feature_mean=_floats_or_none(data.get("feature_mean")),
        feature_std=_floats_or_none(data.get("feature_std")),
    )


def pack_window(w: WindowStats) -> bytes:
    """A window as a `drift_windows.stats` value: its small fields as JSON, a newline, then the feature
    means and standard deviations as raw little-endian float64 (bit-identical, nothing to parse)."""
    classes = w.classes if type(w.classes) is dict else dict(w.classes)
    head = orjson.dumps(
        {"classes": classes, "confidence": w.confidence, "latency_p95": w.latency_p95, "feature_n": w.feature_n}
    )
    if w.feature_mean is None or w.feature_std is None:
        return head
    return head + b"\n" + np.asarray(w.feature_mean, "<f8").tobytes() + np.asarray(w.feature_std, "<f8").tobytes()


def unpack_window(window_start: float, window_end: float, count: int, data: bytes) -> WindowStats:
    head, _, tail = bytes(data).partition(b"\n")
    d = orjson.loads(head)
    mean = std = None
    if tail:
        both = np.frombuffer(tail, dtype="<f8").astype(np.float64)
        half = len(both) // 2
        mean, std = both[:half], both[half:]
    return WindowStats(
        window_start=window_start,
        window_end=window_end,
        count=count,
        classes=d.get("classes") or {},
        confidence=d.get("confidence"),
        latency_p95=d.get("latency_p95"),
        feature_n=int(d.get("feature_n") or 0),
        feature_mean=mean,
        feature_std=std,
    )


def pool_to_json(p: Pool) -> dict[str, Any]:
    return {
        "windows": p.windows,
        "samples": p.samples,
        "classes": p.classes,
        "confidence": p.confidence,
        "latency_p95": p.latency_p95,
        "feature_n": p.feature_n,
        "feature_mean": _list_or_none(p.feature_mean),
        "feature_std": _list_or_none(p.feature_std),
        "window_start": p.window_start,
        "window_end": p.window_end,
    }


def pool_from_json(data: Mapping[str, Any]) -> Pool:
    return Pool(
        windows=int(data["windows"]),
        samples=int(data["samples"]),
        classes=dict(data["classes"]),
        confidence=data.get("confidence"),
        latency_p95=data.get("latency_p95"),
        feature_n=int(data.get("feature_n") or 0),
        feature_mean=_floats_or_none(data.get("feature_mean")),
        feature_std=_floats_or_none(data.get("feature_std")),
        window_start=float(data["window_start"]),
        window_end=float(data["window_end"]),
    )


class WindowCodec:
    """The JSON text of a device's stored windows, with each window's decoded form and its JSON text
    cached: a window never changes, yet it is read and rewritten with every later batch of its device
    while it is among the newest, and decoding its features each time would dominate drift's cost."""

    def __init__(self, capacity: int = _CODEC_CACHE) -> None:
        self._capacity = capacity
        self._by_text: OrderedDict[str, WindowStats] = OrderedDict()
        self._text_of: dict[int, str] = {}
        self._baselines: OrderedDict[str, Pool] = OrderedDict()

    def decode(self, text: str) -> list[WindowStats]:
        if not text or text == "[]":
            return []
        out: list[WindowStats] = []
        # One JSON object per line inside the array: split without parsing what is cached.
        for item in text[2:-2].split("},\n{"):
            fragment = "{" + item + "}"
            window = self._by_text.get(fragment)
            if window is None:
                d = json.loads(fragment)
                window = window_from_json(d["start"], d["end"], d["count"], d)
                self._remember(fragment, window)
            else:
                self._by_text.move_to_end(fragment)
            out.append(window)
        return out

    def encode(self, windows: list[WindowStats]) -> str:
        fragments = []
        for w in windows:
            fragment = self._text_of.get(id(w))
            if fragment is None or self._by_text.get(fragment) is not w:
                row = {"start": w.window_start, "end": w.window_end, "count": w.count, **window_to_json(w)}
                fragment = orjson.dumps(row).decode()
                self._remember(fragment, w)
            fragments.append(fragment)
        return "[" + ",\n".join(fragments) + "]" if fragments else "[]"

    def baseline(self, text: str) -> Pool:
        """A stored baseline (frozen: the same text for the life of a model version), decoded once."""
        pooled = self._baselines.get(text)
        if pooled is None:
            pooled = pool_from_json(json.loads(text))
            self._baselines[text] = pooled
            while len(self._baselines) > self._capacity // 4:
                self._baselines.popitem(last=False)
        else:
            self._baselines.move_to_end(text)
        return pooled

    def _remember(self, fragment: str, window: WindowStats) -> None:
        replaced = self._by_text.get(fragment)
        if replaced is not None and replaced is not window:
            self._text_of.pop(id(replaced), None)
        self._by_text[fragment] = window
        self._text_of[id(window)] = fragment
        while len(self._by_text) > self._capacity:
            _, old = self._by_text.popitem(last=False)
            self._text_of.pop(id(old), None)


def finite(value: float) -> float:
    """A score as JSON can carry it: NaN as 0, infinities clamped."""
    if math.isnan(value):
        return 0.0
    return max(-SCORE_LIMIT, min(SCORE_LIMIT, value))
