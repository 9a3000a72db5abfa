"""Film-quality augmentations that detectors must not learn as a shortcut.

Most children's films here come from one hospital and one of its copies is 224 px square (``kermany``): a model can
learn "low resolution, square, JPEG-soft" instead of "a child". :func:`low_resolution_copy` makes any film look like
such a copy (reduced to a small square or small long side, JPEG re-encoded, enlarged back), and is applied to *both*
classes alike so that resolution carries no label information.
"""

from __future__ import annotations

import cv2
import numpy as np


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Re-encode as 8-bit grey JPEG (what the public copies went through)."""
    ok, buf = cv2.imencode(
        ".jpg", np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    decoded = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) if ok else None
    if decoded is None:
        return img
    return decoded.astype(np.float32) / 255.0


def low_resolution_copy(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The film as a low-resolution copy: 160-256 px (square-stretched half the time), JPEG q 70-95."""
    h, w = img.shape
    side = int(rng.integers(160, 257))
    if rng.random() < 0.5:
        size = (side, side)  # stretched to a square, like the 224 px public copy
    else:
        scale = side / max(h, w)
        size = (max(8, round(w * scale)), max(8, round(h * scale)))
    small = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return jpeg(small, int(rng.integers(70, 96)))


def square_stretch(img: np.ndarray, side: int = 224) -> np.ndarray:
    """The evaluation version: exactly what the ``kermany`` copy is (square ``side`` px, JPEG q 90)."""
    return jpeg(cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA), 90)
