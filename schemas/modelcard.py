"""What an ONNX classifier's metadata_props say about it: the contract between the programs that
write model files (demokit/models.py, cloud_bridge/models/quantize.py) and those that read them.

Every value in metadata_props is a string; some hold JSON. `common.onnx.card_from_metadata` is the
one reader: it decodes them into a `ModelCard`, with one set of defaults for every program:

    model_name           -> name; the file's stem when absent
    model_version        -> version; UNVERSIONED ("0") when absent
    labels               JSON list of class names; when absent "0".."C-1" from a fixed class
                         dimension (a model with neither is refused)
    output_kind          "logits" | "probabilities"; when absent, detected by running the model
                         on trial inputs
    input_spec           JSON InputSpec (a description: programs check inputs against the
                         session's own input)
    reference_class_mix  JSON {label: fraction of held-out predictions}; None when absent
    health_reference     JSON HealthReference: the OTA health check's inputs; None when absent
    heldout_accuracy     decimal text; None when absent
    quantization         JSON QuantizationRecord (int8 builds only); None when absent
    dataset              JSON DatasetRecord; None when absent
    seed                 integer text; None when absent
    train_config         JSON text, kept as written (the demo kit's cache key); None when absent

`metadata` keeps every prop verbatim (a quantized copy carries them over); `declares(key)` tells
whether a value came from the file or from a default.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

OutputKind = Literal["logits", "probabilities"]
OUTPUT_KINDS: tuple[OutputKind, ...] = ("logits", "probabilities")
# The version of a model whose metadata declares none.
UNVERSIONED = "0"


class InputSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How the builder describes one input (the demo models: raw 8x8 pixels, float32, 0..16)."""

    name: str | None = None
    shape: list[int | None] | None = None  # None for a dimension that varies (the batch)
    dtype: str | None = None
    value_range: list[float] | None = None
    layout: str | None = None


class HealthReference(msgspec.Struct, frozen=True, kw_only=True):
    """Inputs and the probabilities the builder's own run of the file gave them: what an edge node
    installing the model over the air re-runs as its health check (edge_node/ota/health.py)."""

    inputs: list[Any]  # one entry per input, nested like the model's input without the batch dim
    probabilities: list[list[float]]  # one row per input, one column per label


class DatasetRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Where the training and held-out data came from."""

    name: str | None = None
    licence: str | None = None
    source: str | None = None
    split_seed: int | None = None
    test_fraction: float | None = None


class QuantizationRecord(msgspec.Struct, frozen=True, kw_only=True):
    """How an int8 model was made from its float model (cloud_bridge/models/quantize.py)."""

    format: str  # "qoperator" | "qdq"
    per_channel: bool
    activations: str
    weights: str
    calibration: str  # "digits:train" or "dir:..."
    calibration_samples: int
    evaluation: str
    float_version: str
    float_sha256: str
    float_accuracy: float
    int8_accuracy: float


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    """An ONNX classifier's metadata, decoded and checked (see the table in this module's docstring)."""

    name: str
    version: str
    labels: tuple[str, ...]
    output_kind: OutputKind
    input_spec: InputSpec | None = None
    reference_class_mix: dict[str, float] | None = None
    health_reference: HealthReference | None = None
    heldout_accuracy: float | None = None
    quantization: QuantizationRecord | None = None
    dataset: DatasetRecord | None = None
    seed: int | None = None
    train_config: str | None = None
    metadata: dict[str, str] = {}

    def declares(self, key: str) -> bool:
        """Whether the file sets metadata_props `key` (else its field holds the default)."""
        return bool(self.metadata.get(key))
