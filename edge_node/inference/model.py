"""The ONNX classifier: one ONNX Runtime session, its input spec and labels, and batched probabilities.

What the model file says is trusted only after checking it: the execution providers that really
run (a requested GPU provider silently falls back to CPU when its libraries are missing), whether
the output is logits or probabilities, and the input shape and dtype every input is checked against.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from common.files import file_sha256
from common.numeric import softmax
from edge_node.errors import InputRejected, ModelLoadError
from schemas import ModelRef

log = logging.getLogger(__name__)

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class ModelInfo:
    """What the node knows about its model, read from the file and its metadata."""

    ref: ModelRef
    path: Path
    labels: tuple[str, ...]
    input_name: str
    feature_shape: tuple[int, ...]  # one input, without the batch dimension
    input_dtype: np.dtype[Any]
    dynamic_batch: bool
    output_kind: str  # "logits" | "probabilities"
    metadata: dict[str, str]

    @property
    def input_bytes(self) -> int:
        """The size of one input's array."""
        return math.prod(self.feature_shape) * self.input_dtype.itemsize


@dataclass(frozen=True)
class ProviderReport:
    requested: tuple[str, ...]
    active: tuple[str, ...]

    @property
    def fallback(self) -> bool:
        """True when a requested accelerator is not what runs the model."""
        wanted = [p for p in self.requested if p != CPU]
        return bool(wanted) and not any(p in self.active for p in wanted)


class Classifier:
    """A loaded, warmed-up classifier. `predict` is thread-safe (ORT sessions are) and blocking."""

    def __init__(self, session: ort.InferenceSession, info: ModelInfo, providers: ProviderReport) -> None:
        self.session = session
        self.info = info
        self.providers = providers
        self._output_name = session.get_outputs()[0].name

    @classmethod
    def load(cls, path: Path, providers: tuple[str, ...] = (CPU,), intra_op_threads: int = 1) -> Classifier:
        """Load and verify a model file; raise ModelLoadError saying what is wrong with it."""
        available = set(ort.get_available_providers())
        missing = [p for p in providers if p not in available]
        if missing:
            log.warning(
                "requested execution providers are not in this onnxruntime build: %s (available: %s); "
                "install the matching onnxruntime package to use them",
                missing,
                sorted(available),
            )
        usable = [p for p in providers if p in available] or [CPU]
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=usable)
        except Exception as exc:  # ORT raises several unrelated types for a bad file
            raise ModelLoadError(f"cannot load model {path}: {exc}") from exc
        report = ProviderReport(tuple(providers), tuple(session.get_providers()))
        if report.fallback:
            log.warning(
                "PROVIDER FALLBACK: requested %s but the model runs on %s; inference is slower than planned",
                list(report.requested),
                list(report.active),
            )
        classifier = cls(session, _read_info(session, path), report)
        classifier.warm_up()
        return classifier

    def warm_up(self, runs: int = 3) -> float:
        """Run a few zero batches (first runs allocate); return the last batch-1 latency in ms."""
        x = np.zeros((1, *self.info.feature_shape), dtype=self.info.input_dtype)
        elapsed = 0.0
        for _ in range(runs):
            start = time.perf_counter()
            self.predict(x)
            elapsed = time.perf_counter() - start
        return elapsed * 1000

    def predict(self, batch: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Class probabilities [N, C] for a checked batch [N, *feature_shape]."""
        return self.probabilities(self.scores(batch))

    def scores(self, batch: npt.NDArray[Any], rows_per_run: int | None = None) -> npt.NDArray[Any]:
        """The model's own output for a checked batch (logits or probabilities, as `session.run`
        gives it): the blocking part of `predict`, and all a worker thread should do. Right after
        a model that streams its weights through the caches, every Python step runs cold (softmax
        took 20 µs instead of 3.5 after a 1 ms MLP), so `probabilities` is left to the caller's
        thread, off the model's critical path.

        A batch larger than the model takes in one run (a fixed batch dimension of 1, or
        `rows_per_run`) is run in slices, one after the other, and their outputs joined."""
        per_run = (rows_per_run or len(batch)) if self.info.dynamic_batch else 1
        if len(batch) <= per_run:
            return self._run(batch)
        return np.concatenate([self._run(batch[i : i + per_run]) for i in range(0, len(batch), per_run)])

    def _run(self, batch: npt.NDArray[Any]) -> npt.NDArray[Any]:
        (out,) = self.session.run([self._output_name], {self.info.input_name: batch})
        return out  # type: ignore[no-any-return]  # ORT returns the output as an ndarray

    def probabilities(self, scores: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Class probabilities [N, C] from what `scores` returned for a batch of N."""
        flat = np.asarray(scores, dtype=np.float32).reshape(scores.shape[0], -1)
        if self.info.output_kind == "logits":
            return softmax(flat)
        return flat

    def check_input(self, value: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Return one input shaped and typed for the model, or raise InputRejected saying why."""
        arr = np.asarray(value)
        if arr.shape != self.info.feature_shape:
            if arr.shape == (1, *self.info.feature_shape):
                arr = arr[0]
            else:
                raise InputRejected(
                    "shape", f"got shape {list(arr.shape)}, the model takes {list(self.info.feature_shape)}"
                )
        want = self.info.input_dtype
        if arr.dtype != want:
            if arr.dtype.kind not in "fiu" or (want.kind in "iu" and arr.dtype.kind == "f"):
                raise InputRejected("dtype", f"got {arr.dtype}, the model takes {want}")
            arr = arr.astype(want)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InputRejected("nonfinite", f"{int((~np.isfinite(arr)).sum())} NaN/inf value(s)")
        return arr


def _read_info(session: ort.InferenceSession, path: Path) -> ModelInfo:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or not outputs:
        raise ModelLoadError(f"model {path} must have exactly one input and an output (has {len(inputs)} inputs)")
    spec = inputs[0]
    dtype = _ORT_DTYPES.get(spec.type)
    if dtype is None:
        raise ModelLoadError(f"model {path} input {spec.name!r} has type {spec.type}, which the node cannot feed")
    dims = list(spec.shape)
    if not dims:
        raise ModelLoadError(f"model {path} input {spec.name!r} is a scalar; a batch dimension is needed")
    feature = tuple(dims[1:])
    if not all(isinstance(d, int) and d > 0 for d in feature):
        raise ModelLoadError(
            f"model {path} input {spec.name!r} has dynamic feature dims {dims}; only the batch may vary"
        )
    meta = dict(session.get_modelmeta().custom_metadata_map)
    n_classes = outputs[0].shape[-1] if outputs[0].shape and isinstance(outputs[0].shape[-1], int) else None
    labels = _labels(meta, n_classes, path)
    digest = file_sha256(path)
    ref = ModelRef(
        name=meta.get("model_name") or path.stem,
        version=meta.get("model_version") or "0",
        sha256=digest,
    )
    kind = meta.get("output_kind", "")
    info = ModelInfo(
        ref=ref,
        path=path,
        labels=labels,
        input_name=spec.name,
        feature_shape=feature,
        input_dtype=np.dtype(dtype),
        dynamic_batch=not isinstance(dims[0], int),
        output_kind=kind,
        metadata=meta,
    )
    if kind not in ("logits", "probabilities"):
        info = _with_detected_output_kind(session, info)
    return info


def _labels(meta: dict[str, str], n_classes: int | None, path: Path) -> tuple[str, ...]:
    raw = meta.get("labels")
    if raw is None:
        if n_classes is None:
            raise ModelLoadError(f"model {path} has no 'labels' metadata and no fixed class dimension")
        return tuple(str(i) for i in range(n_classes))
    try:
        labels = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"model {path} metadata 'labels' is not JSON: {exc}") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        raise ModelLoadError(f"model {path} metadata 'labels' must be a JSON list of strings")
    if n_classes is not None and len(labels) != n_classes:
        raise ModelLoadError(f"model {path} has {n_classes} outputs but {len(labels)} labels")
    return tuple(labels)


def _with_detected_output_kind(session: ort.InferenceSession, info: ModelInfo) -> ModelInfo:
    """No `output_kind` metadata: decide from outputs on varied inputs (rows in [0,1] summing to 1)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, *info.feature_shape)).astype(info.input_dtype)
    if not info.dynamic_batch:
        x = x[:1]
    out = np.asarray(session.run(None, {info.input_name: x})[0], dtype=np.float64).reshape(x.shape[0], -1)
    is_probs = bool((out >= 0).all() and (out <= 1).all() and np.allclose(out.sum(axis=1), 1.0, atol=1e-3))
    kind = "probabilities" if is_probs else "logits"
    log.info("model %s has no output_kind metadata; detected %s", info.path, kind)
    return ModelInfo(**{**info.__dict__, "output_kind": kind})
