"""The display faults the self-supervised detectors learn, as transforms of a decoded [0, 1] film.

Each is a detector's label (``orientation``: rot90/180/270; ``inversion``: inverted; ``flip``: mirrored) and the
others' nuisance (an inverted film is not "rotated"); kept in one module so that the detectors that learn a fault
and those that must ignore it use the very same transform. Function names are what the model card lists.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def identity(img: np.ndarray) -> np.ndarray:
    return img


def rot(k: int) -> Callable[[np.ndarray], np.ndarray]:
    """The film turned ``90 * k`` degrees counter-clockwise (``numpy.rot90``)."""

    def fn(img: np.ndarray) -> np.ndarray:
        return np.rot90(img, k) if k else img

    fn.__name__ = f"rot{90 * k}"
    return fn


def invert(img: np.ndarray) -> np.ndarray:
    return 1.0 - img


def mirror(img: np.ndarray) -> np.ndarray:
    return img[:, ::-1]
