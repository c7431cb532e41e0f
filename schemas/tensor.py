"""Tensors on the wire: numpy arrays <-> `Tensor` (dtype, shape, little-endian bytes)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from schemas.errors import TensorError
from schemas.messages import DType, Tensor

_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
}


def encode_tensor(array: npt.ArrayLike) -> Tensor:
    """Pack an array (any supported dtype) for the wire, little-endian and C-ordered."""
    arr = np.asarray(array)
    name = arr.dtype.name
    if name not in _DTYPES:
        raise TensorError(f"dtype {name} cannot go on the wire (supported: {', '.join(_DTYPES)})")
    data = np.ascontiguousarray(arr, dtype=_DTYPES[name]).tobytes()
    dtype: DType = name  # type: ignore[assignment]
    return Tensor(dtype=dtype, shape=list(arr.shape), data=data)


def decode_tensor(tensor: Tensor, *, field: str = "$.input", allow_nonfinite: bool = False) -> npt.NDArray[Any]:
    """Unpack a wire tensor; raise TensorError naming the field if bytes, shape and dtype disagree.

    Floating-point tensors holding NaN or inf are refused unless `allow_nonfinite`: a model fed
    NaN answers with NaN probabilities that look like a confident class downstream.
    """
    dtype = _DTYPES[tensor.dtype]
    raw = tensor.data
    expected = math.prod(tensor.shape) * dtype.itemsize
    if len(raw) != expected:
        raise TensorError(
            f"shape {tensor.shape} of {tensor.dtype} needs {expected} bytes, data has {len(raw)}",
            field=f"{field}.data",
        )
    arr = np.frombuffer(raw, dtype=dtype).reshape(tensor.shape)
    if not allow_nonfinite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise TensorError(f"{bad} value(s) are NaN or infinite", field=f"{field}.data")
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)
