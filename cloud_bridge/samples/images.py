"""Input tensors as pictures for labelers: which shapes are images, and a dependency-free PNG encoder.

Pillow is not a dependency of the project (it only arrives with matplotlib in some dev setups), and
an 8-bit grayscale/RGB/RGBA PNG is a header, zlib-compressed rows and three CRCs: numpy + zlib do it.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

import numpy as np
import numpy.typing as npt

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (gray, RGB, RGBA)
MIN_SIDE = 4  # a 1-D or 2-D input smaller than 4x4 is a feature vector, not a picture
AUTO_ZOOM_SIDE = 64  # auto zoom makes the longer side at least this many pixels (8x8 digits -> 64x64)


def image_of(array: npt.NDArray[Any]) -> npt.NDArray[np.uint8] | None:
    """The input as an H x W (gray) or H x W x C (RGB/RGBA) uint8 picture, or None if it is not one.

    Leading batch dimensions of size 1 are dropped; a 1-D input whose length is a square (64 -> 8x8
    digits, 784 -> 28x28) is taken as a square gray image; C x H x W is moved to H x W x C. Values
    are scaled from the image's own min..max to 0..255 (uint8 is kept as is), NaN/inf become 0.
    """
    a = np.asarray(array)
    while a.ndim > 1 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 1:
        side = math.isqrt(a.size)
        if side * side != a.size:
            return None
        a = a.reshape(side, side)
    elif a.ndim == 3:
        if a.shape[-1] not in _COLOR_TYPES and a.shape[0] in _COLOR_TYPES:
            a = np.moveaxis(a, 0, -1)
        if a.shape[-1] not in _COLOR_TYPES:
            return None
        if a.shape[-1] == 1:
            a = a[..., 0]
    elif a.ndim != 2:
        return None
    if min(a.shape[0], a.shape[1]) < MIN_SIDE:
        return None
    return _to_uint8(a)


def _to_uint8(a: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    values = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def zoom(image: npt.NDArray[np.uint8], factor: int = 0) -> npt.NDArray[np.uint8]:
    """Nearest-neighbour upscale by `factor` (0 = auto: longer side at least AUTO_ZOOM_SIDE pixels)."""
    if factor <= 0:
        factor = max(1, math.ceil(AUTO_ZOOM_SIDE / max(image.shape[0], image.shape[1])))
    if factor == 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def encode_png(image: npt.NDArray[np.uint8]) -> bytes:
    """An 8-bit PNG of an H x W (gray) or H x W x 3/4 (RGB/RGBA) uint8 array."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"encode_png needs an H x W or H x W x C uint8 array, got {image.dtype} {image.shape}")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels not in _COLOR_TYPES:
        raise ValueError(f"encode_png supports 1, 3 or 4 channels, got {channels}")
    height, width = image.shape[0], image.shape[1]
    rows = np.zeros((height, 1 + width * channels), dtype=np.uint8)  # filter byte 0 (None) per row
    rows[:, 1:] = image.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPES[channels], 0, 0, 0)
    return b"".join(
        (_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)), _chunk(b"IEND", b""))
    )


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
