"""Decoded film -> model input tensor, as the model's manifest says. Shared by the gate and by training.

A detector is only as good as the agreement between the pixels it was trained on and the pixels it is served. The
manifest of every model carries a :class:`PreprocessSpec`; training builds its inputs with :func:`preprocess` and the
gate does the same, so a film gives the same tensor in both.

- ``letterbox`` keeps the aspect ratio (a rotated portrait film becomes landscape, which is real information) and pads
  the rest; ``stretch`` fills the square.
- ``zscore`` standardises each film over its own pixels (not the padding, which is set to 0): detectors then do not
  depend on window, gain or exposure. ``unit`` keeps the displayed [0, 1] values (padding 0), for detectors that must
  see brightness, such as washed-out or blank films.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from filmgate.typed_config import build

RESIZE_MODES = ("letterbox", "stretch")
NORMALIZE_MODES = ("zscore", "unit")


@dataclass(frozen=True)
class PreprocessSpec:
    """How a model wants its input: ``size`` x ``size`` grey pixels, resized and normalised as named."""

    size: int = 128
    resize: str = "letterbox"
    normalize: str = "zscore"

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or not 16 <= self.size <= 1024:
            raise ValueError(f"preprocessing.size must be an integer between 16 and 1024, got {self.size!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"preprocessing.resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"preprocessing.normalize must be one of {NORMALIZE_MODES}, got {self.normalize!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        """A ``preprocessing`` mapping (a manifest's, a training config's) -> the spec; a :class:`ConfigError`
        (a ValueError) naming the key otherwise."""
        spec: PreprocessSpec = build(cls, data, "preprocessing.")
        return spec

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_square(pixels: np.ndarray, size: int, resize: str = "letterbox") -> tuple[np.ndarray, np.ndarray | None]:
    """Resize a 2-D float image into a ``size`` x ``size`` square; returns it and the mask of real pixels.

    The mask is None when every pixel is real (``stretch``, or a square film).
    """
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {pixels.shape}")
    h, w = pixels.shape
    src = np.ascontiguousarray(pixels, dtype=np.float32)
    if resize == "stretch" or h == w:
        interp = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR
        return cv2.resize(src, (size, size), interpolation=interp), None
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(src, (nw, nh), interpolation=interp)
    out = np.zeros((size, size), dtype=np.float32)
    mask = np.zeros((size, size), dtype=bool)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = small
    mask[top : top + nh, left : left + nw] = True
    return out, mask


def normalize(square: np.ndarray, mask: np.ndarray | None, mode: str) -> np.ndarray:
    """Normalise a square image; padding (outside ``mask``) becomes 0 in both modes."""
    if mode == "zscore":
        values = square if mask is None else square[mask]
        mean = float(values.mean())
        std = float(values.std())
        out = (square - np.float32(mean)) / np.float32(max(std, 1e-3))
    else:
        out = square.copy()
    if mask is not None:
        out[~mask] = 0.0
    return out.astype(np.float32, copy=False)


def preprocess(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """One decoded film (float32 HxW in [0, 1]) to a (1, size, size) float32 model input."""
    square, mask = fit_square(pixels, spec.size, spec.resize)
    return normalize(square, mask, spec.normalize)[None, :, :]


def preprocess_batch(images: Sequence[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Several decoded films to an (N, 1, size, size) float32 batch."""
    out = np.empty((len(images), 1, spec.size, spec.size), dtype=np.float32)
    for i, pixels in enumerate(images):
        out[i] = preprocess(pixels, spec)
    return out
