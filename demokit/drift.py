"""Drift injection for batches of 8x8 digit images (float32 [N, 64], pixel values 0..16).

Used by the replay source to simulate a device whose inputs change (sensor noise, a camera mounted at an
angle, a different population of inputs) and by the drift tests. Every random transform takes a seeded
``numpy.random.Generator``, so a run is reproducible. Rotation uses ``scipy.ndimage`` when it is
installed (it always is alongside scikit-learn) and an equivalent bilinear numpy implementation otherwise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

SIDE = 8
PIXEL_MAX = 16.0

DriftKind = Literal["none", "noise", "rotation", "class_shift"]
RotateBackend = Literal["auto", "scipy", "numpy"]
ClassWeights = Sequence[float] | Mapping[int, float] | NDArray[np.floating]


def add_noise(X: NDArray[np.float32], sigma: float, rng: np.random.Generator) -> NDArray[np.float32]:
    """Add Gaussian pixel noise of standard deviation ``sigma`` (pixel units), clipped to 0..16."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    images = _as_batch(X)
    noisy = images + rng.normal(0.0, sigma, size=images.shape)
    return np.clip(noisy, 0.0, PIXEL_MAX).astype(np.float32)


def rotate(X: NDArray[np.float32], degrees: float, *, backend: RotateBackend = "auto") -> NDArray[np.float32]:
    """Rotate every image counter-clockwise (as displayed, row 0 at the top) about its centre.

    Bilinear interpolation, zero outside the image, result clipped to 0..16. ``backend`` picks scipy or
    the numpy implementation; "auto" prefers scipy.
    """
    images = _as_batch(X).reshape(-1, SIDE, SIDE)
    if backend == "numpy" or (backend == "auto" and not _scipy_available()):
        rotated = _rotate_bilinear(images, degrees)
    else:
        from scipy import ndimage  # type: ignore[import-untyped]

        # axes=(2, 1) is scipy's 2-D default (1, 0) applied to each image of the stack.
        rotated = ndimage.rotate(images, degrees, axes=(2, 1), reshape=False, order=1, mode="constant", cval=0.0)
    return np.clip(rotated, 0.0, PIXEL_MAX).astype(np.float32).reshape(-1, SIDE * SIDE)


def class_mix_shift(
    y: NDArray[np.integer], weights: ClassWeights, rng: np.random.Generator, size: int | None = None
) -> NDArray[np.intp]:
    """Indices into ``y`` (drawn with replacement, shuffled) whose class mix follows ``weights``.

    ``weights`` is one weight per class index (a sequence) or {class index: weight}; missing classes
    weigh 0. Class counts are allocated exactly (largest remainder), so the mix is as close to the
    request as ``size`` (default ``len(y)``) allows.
    """
    labels = np.asarray(y)
    total = len(labels) if size is None else size
    if total < 0:
        raise ValueError(f"size must be >= 0, got {total}")
    mix = _normalise_weights(weights, int(labels.max(initial=-1)) + 1)
    counts = _allocate(mix, total)
    chosen: list[NDArray[np.intp]] = []
    for cls, count in enumerate(counts):
        if count == 0:
            continue
        members = np.flatnonzero(labels == cls)
        if members.size == 0:
            raise ValueError(f"class {cls} has weight {mix[cls]:.3f} but no samples in y")
        chosen.append(rng.choice(members, size=int(count), replace=True))
    indices = np.concatenate(chosen) if chosen else np.empty(0, dtype=np.intp)
    return rng.permutation(indices).astype(np.intp)


def class_mix(y: NDArray[np.integer], num_classes: int) -> NDArray[np.float64]:
    """Fraction of each class index in ``y``."""
    counts = np.bincount(np.asarray(y), minlength=num_classes)[:num_classes]
    return counts / max(len(y), 1)


# What "drift = KIND" injects when no strength is given: strong enough that the bridge's detectors
# fire within a few windows on the demo digits (bench/drift.py measures these).
DEFAULT_STRENGTH: dict[str, float] = {"none": 0.0, "noise": 4.0, "rotation": 20.0, "class_shift": 0.3}


@dataclass(frozen=True)
class DriftSpec:
    """A drift to inject, and how strong.

    * ``none``: inputs unchanged.
    * ``noise``: Gaussian pixel noise, ``strength`` = sigma in pixel units (0..16 scale).
    * ``rotation``: ``strength`` = degrees counter-clockwise.
    * ``class_shift``: resample the batch so its class mix moves from the batch's own mix towards
      ``target_weights`` (default: everything class 0); ``strength`` in [0, 1] is how far.
    """

    kind: DriftKind
    strength: float = 0.0
    target_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in get_args(DriftKind):
            raise ValueError(f"unknown drift kind {self.kind!r}")
        if not math.isfinite(self.strength) or self.strength < 0:
            raise ValueError(f"strength must be finite and >= 0, got {self.strength}")
        if self.kind == "class_shift" and self.strength > 1:
            raise ValueError(f"class_shift strength must be in [0, 1], got {self.strength}")

    @classmethod
    def parse(cls, text: str) -> DriftSpec:
        """Parse "kind" or "kind:strength", e.g. "rotation:25" or "noise:3" (for command lines)."""
        kind, _, strength = text.partition(":")
        if kind not in get_args(DriftKind):
            raise ValueError(f"unknown drift kind {kind!r}; expected one of {get_args(DriftKind)}")
        return cls(kind=kind, strength=float(strength) if strength else 0.0)  # type: ignore[arg-type]

    def apply(
        self,
        X: NDArray[np.float32],
        y: NDArray[np.integer],
        rng: np.random.Generator,
        *,
        rotate_backend: RotateBackend = "auto",
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """The drifted batch: transformed images and their (possibly resampled) true labels.
        `rotate_backend` as for `rotate` ("numpy" spares a process importing scipy)."""
        images = _as_batch(X)
        labels = np.asarray(y, dtype=np.int64)
        if self.kind == "noise":
            return add_noise(images, self.strength, rng), labels
        if self.kind == "rotation":
            return rotate(images, self.strength, backend=rotate_backend), labels
        if self.kind == "class_shift":
            indices = class_mix_shift(labels, self._shifted_mix(labels), rng)
            return images[indices], labels[indices]
        return images, labels

    def _shifted_mix(self, labels: NDArray[np.int64]) -> NDArray[np.float64]:
        num_classes = max(int(labels.max(initial=-1)) + 1, len(self.target_weights or ()))
        target = (
            _normalise_weights(self.target_weights, num_classes)
            if self.target_weights is not None
            else np.eye(num_classes)[0]
        )
        return (1.0 - self.strength) * class_mix(labels, num_classes) + self.strength * target


def _as_batch(X: NDArray[np.float32]) -> NDArray[np.float32]:
    images = np.asarray(X, dtype=np.float32)
    if images.ndim != 2 or images.shape[1] != SIDE * SIDE:
        raise ValueError(f"expected images of shape [N, {SIDE * SIDE}], got {images.shape}")
    return images


def _scipy_available() -> bool:
    try:
        import scipy.ndimage  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        logger.debug("scipy missing, rotating with numpy")
        return False
    return True


def _rotate_bilinear(images: NDArray[np.float32], degrees: float) -> NDArray[np.float64]:
    """Bilinear rotation of an [N, 8, 8] stack matching scipy.ndimage.rotate(order=1, mode="constant")."""
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    centre = (SIDE - 1) / 2.0
    rows, cols = np.meshgrid(np.arange(SIDE, dtype=np.float64), np.arange(SIDE, dtype=np.float64), indexing="ij")
    # Inverse mapping: for each output pixel, the source point it comes from.
    src_rows = centre + cos * (rows - centre) + sin * (cols - centre)
    src_cols = centre - sin * (rows - centre) + cos * (cols - centre)
    tolerance = 1e-9  # float error must not push a point exactly on the border outside
    inside = (
        (src_rows >= -tolerance)
        & (src_rows <= SIDE - 1 + tolerance)
        & (src_cols >= -tolerance)
        & (src_cols <= SIDE - 1 + tolerance)
    )
    src_rows = np.clip(src_rows, 0.0, SIDE - 1.0)
    src_cols = np.clip(src_cols, 0.0, SIDE - 1.0)
    r0 = np.minimum(np.floor(src_rows).astype(np.intp), SIDE - 2)
    c0 = np.minimum(np.floor(src_cols).astype(np.intp), SIDE - 2)
    fr, fc = src_rows - r0, src_cols - c0
    stack = images.astype(np.float64)
    rotated = (
        stack[:, r0, c0] * (1 - fr) * (1 - fc)
        + stack[:, r0 + 1, c0] * fr * (1 - fc)
        + stack[:, r0, c0 + 1] * (1 - fr) * fc
        + stack[:, r0 + 1, c0 + 1] * fr * fc
    )
    return np.where(inside, rotated, 0.0)


def _normalise_weights(weights: ClassWeights, min_classes: int) -> NDArray[np.float64]:
    if isinstance(weights, Mapping):
        size = max(min_classes, *(int(key) + 1 for key in weights)) if weights else min_classes
        mix = np.zeros(size, dtype=np.float64)
        for key, value in weights.items():
            mix[int(key)] = value
    else:
        mix = np.zeros(max(min_classes, len(weights)), dtype=np.float64)
        mix[: len(weights)] = np.asarray(weights, dtype=np.float64)
    total = float(mix.sum())
    if np.any(mix < 0) or not np.all(np.isfinite(mix)) or total <= 0:
        raise ValueError("class weights must be finite, >= 0, and not all zero")
    return mix / total


def _allocate(mix: NDArray[np.float64], total: int) -> NDArray[np.int64]:
    exact = mix * total
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    # Largest remainder first; stable sort keeps ties in class order so allocation is deterministic.
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:remainder]] += 1
    return counts
