"""The ONNX classifier: one ONNX Runtime session, its input spec and labels, and batched probabilities.

Loading, the execution-provider check and reading the metadata are common/onnx.py's (the cloud
reads models the same way); this module adds what serving needs: the model's identity (its file's
sha256), a warm-up, and the checks every input goes through before it is batched.
"""

from __future__ import annotations

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
from common.onnx import CPU, OnnxModel, ProviderReport, load_model
from edge_node.errors import InputRejected, ModelLoadError
from schemas import ModelRef
from schemas.modelcard import ModelCard, OutputKind

__all__ = ["CPU", "Classifier", "ModelInfo", "ProviderReport"]


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
    output_kind: OutputKind
    card: ModelCard

    @property
    def input_bytes(self) -> int:
        """The size of one input's array."""
        return math.prod(self.feature_shape) * self.input_dtype.itemsize

    @classmethod
    def of(cls, model: OnnxModel) -> ModelInfo:
        """The info of a loaded model; its ref names the file by its sha256."""
        card, sig = model.card, model.signature
        return cls(
            ref=ModelRef(name=card.name, version=card.version, sha256=file_sha256(model.path)),
            path=model.path,
            labels=card.labels,
            input_name=sig.input_name,
            feature_shape=sig.feature_shape,
            input_dtype=sig.input_dtype,
            dynamic_batch=sig.dynamic_batch,
            output_kind=card.output_kind,
            card=card,
        )


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
        model = load_model(path, error=ModelLoadError, providers=providers, intra_op_threads=intra_op_threads)
        classifier = cls(model.session, ModelInfo.of(model), model.providers)
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
