"""ONNX classifiers: one way to open a session, read what it takes and gives, and read its metadata.

What a model file says is trusted only after checking it: the execution providers that really run
(a requested GPU provider silently falls back to CPU when its libraries are missing), that it is
a classifier at all (one input whose dimensions, but the batch, are fixed; one row of class scores
per input), and its metadata_props, decoded once into a `ModelCard` (schemas/modelcard.py) with the
same defaults for every program.

Every function that refuses a model takes `error`, the exception type the calling program raises
for a bad model (the edge: edge_node.errors.ModelLoadError), and says what is wrong and with which
file. ONNX Runtime raises unrelated exception types for a bad file or a failed run (InvalidProtobuf,
InvalidArgument, Fail, NoSuchFile, RuntimeException, ...): `_ort_errors` is the one place that
catches them all.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np
import onnxruntime as ort

from schemas.modelcard import (
    OUTPUT_KINDS,
    UNVERSIONED,
    DatasetRecord,
    HealthReference,
    InputSpec,
    ModelCard,
    OutputKind,
    QuantizationRecord,
)

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
# The input element types a program can feed from numpy.
ORT_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}
# Rows run to tell logits from probabilities when the metadata does not say.
_TRIAL_ROWS = 8
_T = TypeVar("_T")


@dataclass(frozen=True)
class ProviderReport:
    requested: tuple[str, ...]
    active: tuple[str, ...]

    @property
    def fallback(self) -> bool:
        """True when a requested accelerator is not what runs the model."""
        wanted = [p for p in self.requested if p != CPU]
        return bool(wanted) and not any(p in self.active for p in wanted)


@dataclass(frozen=True)
class Signature:
    """The classifier's one input and its class-score output, as the session declares them."""

    input_name: str
    input_dtype: np.dtype[Any]
    feature_shape: tuple[int, ...]  # one input, without the batch dimension
    batch: int | None  # None when the batch dimension varies
    output_name: str
    classes: int | None  # scores per input, None when that dimension varies

    @property
    def dynamic_batch(self) -> bool:
        return self.batch is None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The input's shape with -1 for a batch dimension that varies."""
        return (self.batch if self.batch is not None else -1, *self.feature_shape)


@dataclass(frozen=True)
class OnnxModel:
    """A loaded classifier: its session, what it takes and gives, and its metadata."""

    path: Path
    session: ort.InferenceSession
    signature: Signature
    card: ModelCard
    providers: ProviderReport


@contextmanager
def _ort_errors(path: Path, error: type[Exception], doing: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # ORT raises several unrelated types for a bad file or a failed run
        raise error(_failure(path, exc, doing)) from exc


def _failure(path: Path, exc: Exception, doing: str) -> str:
    name = type(exc).__name__
    text = " ".join(str(exc).split())  # one line: ORT's texts may end in, or hold, line breaks
    if name == "InvalidProtobuf" or "No graph was found" in text:
        return f"{path} is not an ONNX model (it does not parse as one: another kind of file, or truncated)"
    if name == "NoSuchFile":
        return f"model file {path} does not exist"
    return f"cannot {doing} model {path}: {text}"


def open_session(
    path: Path,
    *,
    error: type[Exception],
    providers: tuple[str, ...] = (CPU,),
    intra_op_threads: int = 1,
    data: bytes | None = None,
) -> tuple[ort.InferenceSession, ProviderReport]:
    """An ONNX Runtime session of `path` (or of `data`, its bytes already read), on the requested
    execution providers this build has; says so in the log when one is missing or falls back."""
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
    # One thread unless asked: on small models thread hand-offs cost more than they save.
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    with _ort_errors(path, error, "load"):
        session = ort.InferenceSession(data if data is not None else str(path), sess_options=options, providers=usable)
    report = ProviderReport(tuple(providers), tuple(session.get_providers()))
    if report.fallback:
        log.warning(
            "PROVIDER FALLBACK: requested %s but the model runs on %s; inference is slower than planned",
            list(report.requested),
            list(report.active),
        )
    return session, report


def load_model(
    path: Path,
    *,
    error: type[Exception],
    providers: tuple[str, ...] = (CPU,),
    intra_op_threads: int = 1,
    data: bytes | None = None,
) -> OnnxModel:
    """Open `path` and check it is a classifier a program can feed; read its card."""
    session, report = open_session(path, error=error, providers=providers, intra_op_threads=intra_op_threads, data=data)
    signature = read_signature(session, path, error=error)
    props = dict(session.get_modelmeta().custom_metadata_map)
    detected = None if props.get("output_kind") else _detect_output_kind(session, signature, path, error)
    card = card_from_metadata(props, path=path, classes=signature.classes, error=error, detected_output_kind=detected)
    return OnnxModel(path, session, signature, card, report)


def read_card(path: Path, *, error: type[Exception]) -> ModelCard:
    """The metadata of the classifier in `path` (loaded and checked on the CPU)."""
    return load_model(path, error=error).card


def read_signature(session: ort.InferenceSession, path: Path, *, error: type[Exception]) -> Signature:
    """The session's input and output, refused unless they are a classifier's: one input of a type
    numpy can feed, fixed but for the batch, and an output of one row of class scores per input."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or not outputs:
        raise error(f"model {path} must have exactly one input and an output (has {len(inputs)} inputs)")
    spec = inputs[0]
    dtype = ORT_DTYPES.get(spec.type)
    if dtype is None:
        raise error(f"model {path} input {spec.name!r} has type {spec.type}, which cannot be fed from numpy")
    dims = list(spec.shape)
    if not dims:
        raise error(f"model {path} input {spec.name!r} is a scalar; a batch dimension is needed")
    feature = tuple(dims[1:])
    if not all(isinstance(d, int) and d > 0 for d in feature):
        raise error(f"model {path} input {spec.name!r} has dynamic feature dims {dims}; only the batch may vary")
    out = outputs[0]
    out_dims = list(out.shape or [])
    # Unknown (no shape information) is given the benefit of the doubt; [N, C] and [N, C, 1, 1]
    # are class scores; [N] or [N, 3, H, W] are not.
    if out_dims and (len(out_dims) < 2 or sum(1 for d in out_dims[1:] if d != 1) > 1):
        raise error(
            f"model {path} is not a classifier: its output {out.name!r} has shape {out_dims}, "
            "not one row of class scores per input"
        )
    fixed = [d for d in out_dims[1:] if isinstance(d, int)]
    classes = math.prod(fixed) if out_dims and len(fixed) == len(out_dims) - 1 else None
    batch = dims[0] if isinstance(dims[0], int) else None
    return Signature(spec.name, np.dtype(dtype), feature, batch, out.name, classes)


def _detect_output_kind(
    session: ort.InferenceSession, signature: Signature, path: Path, error: type[Exception]
) -> OutputKind:
    """No `output_kind` metadata: decide from outputs on varied inputs (rows in [0,1] summing to 1)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(signature.batch or _TRIAL_ROWS, *signature.feature_shape)).astype(signature.input_dtype)
    with _ort_errors(path, error, "run trial inputs through"):
        out = session.run([signature.output_name], {signature.input_name: x})[0]
    scores = np.asarray(out, dtype=np.float64).reshape(x.shape[0], -1)
    is_probs = bool((scores >= 0).all() and (scores <= 1).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3))
    kind: OutputKind = "probabilities" if is_probs else "logits"
    log.info("model %s has no output_kind metadata; detected %s", path, kind)
    return kind


def card_from_metadata(
    props: Mapping[str, str],
    *,
    path: Path,
    classes: int | None,
    error: type[Exception],
    detected_output_kind: OutputKind | None = None,
) -> ModelCard:
    """Decode metadata_props into a ModelCard with the defaults of schemas/modelcard.py; raise
    `error` naming the key when a value is not what that key holds. `classes` is the model's fixed
    number of class scores (None when it varies); `detected_output_kind` what running it showed."""
    meta = dict(props)
    kind = meta.get("output_kind") or detected_output_kind
    if kind not in OUTPUT_KINDS:
        what = f"has output_kind {kind!r}" if kind else "declares no output_kind"
        raise error(f"model {path} {what}: it must be 'logits' or 'probabilities'")
    return ModelCard(
        name=meta.get("model_name") or path.stem,
        version=meta.get("model_version") or UNVERSIONED,
        labels=_labels(meta, classes, path, error),
        output_kind=kind,
        input_spec=_json(meta, "input_spec", InputSpec, path, error),
        reference_class_mix=_json(meta, "reference_class_mix", dict[str, float], path, error),
        health_reference=_json(meta, "health_reference", HealthReference, path, error),
        heldout_accuracy=_number(meta, "heldout_accuracy", float, path, error),
        quantization=_json(meta, "quantization", QuantizationRecord, path, error),
        dataset=_json(meta, "dataset", DatasetRecord, path, error),
        seed=_number(meta, "seed", int, path, error),
        train_config=meta.get("train_config"),
        metadata=meta,
    )


def _labels(meta: dict[str, str], classes: int | None, path: Path, error: type[Exception]) -> tuple[str, ...]:
    raw = meta.get("labels")
    if raw is None:
        if classes is None:
            raise error(f"model {path} has no 'labels' metadata and no fixed class dimension")
        return tuple(str(i) for i in range(classes))
    try:
        labels = msgspec.json.decode(raw, type=tuple[str, ...])
    except msgspec.DecodeError as exc:
        raise error(f"model {path} metadata 'labels' must be a JSON list of class names: {exc}") from None
    if not labels or not all(labels):
        raise error(f"model {path} metadata 'labels' must be a non-empty list of non-empty class names")
    if classes is not None and len(labels) != classes:
        raise error(f"model {path} has {classes} outputs but {len(labels)} labels")
    return labels


def _json(meta: dict[str, str], key: str, kind: type[_T], path: Path, error: type[Exception]) -> _T | None:
    raw = meta.get(key)
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.DecodeError as exc:
        raise error(f"model {path} metadata {key!r} is not a valid {key}: {exc}") from None


def _number(meta: dict[str, str], key: str, kind: Callable[[str], _T], path: Path, error: type[Exception]) -> _T | None:
    raw = meta.get(key)
    if raw is None:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise error(f"model {path} metadata {key!r} is {raw!r}, not a number") from None
