"""Synthetic "wrong" films for showing and testing what the ``atypical`` detector catches.

Each function takes a decoded film (float32 HxW in [0, 1]) and returns one that a research pipeline would not want
as a clean frontal chest film. They are used only for evaluation (never for fitting the atypical score).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np


def collimated(img: np.ndarray) -> np.ndarray:
    """Shuttered down to a small field (about a third of each side); the rest unexposed (white)."""
    h, w = img.shape
    out = np.ones_like(img)
    t, left = int(h * 0.35), int(w * 0.3)
    out[t : t + h // 3, left : left + w // 3] = img[t : t + h // 3, left : left + w // 3]
    return out


def zoomed(img: np.ndarray) -> np.ndarray:
    """A small part of the film enlarged to fill it (a fifth of each side)."""
    h, w = img.shape
    return np.ascontiguousarray(img[h // 3 : h // 3 + h // 5, w // 3 : w // 3 + w // 5])


def washed_out(img: np.ndarray) -> np.ndarray:
    """Over-exposed / wrong window: everything pale with little contrast."""
    return np.clip(0.85 + 0.1 * img, 0.0, 1.0).astype(np.float32)


def dark(img: np.ndarray) -> np.ndarray:
    """Under-exposed: nearly black with little contrast."""
    return (0.08 * img).astype(np.float32)


def nearly_blank(img: np.ndarray) -> np.ndarray:
    """An exposure with (almost) nothing on it: flat grey with a trace of the film and noise."""
    rng = np.random.default_rng(int(img.size) % 9973)
    return np.clip(0.5 + 0.03 * (img - 0.5) + rng.normal(0, 0.01, img.shape), 0, 1).astype(np.float32)


def screenshot(img: np.ndarray) -> np.ndarray:
    """A screen capture of a viewer: the film small on a dark 16:9 window with tool bars and text."""
    h = max(img.shape)
    H, W = h, int(h * 16 / 9)  # noqa: N806
    canvas = np.full((H, W), 0.15, np.float32)
    canvas[: H // 12] = 0.35  # tool bar
    canvas[:, : W // 8] = 0.25  # side panel
    fh = int(H * 0.7)
    fw = int(img.shape[1] * fh / img.shape[0])
    film = cv2.resize(img, (fw, fh), interpolation=cv2.INTER_AREA)
    top, left = H // 6, W // 4
    canvas[top : top + fh, left : left + fw] = film[: H - top, : W - left]
    text = np.zeros((H, W), np.uint8)  # OpenCV draws text on 8-bit images only
    for i in range(8):
        y = H // 12 + (i + 2) * H // 20
        cv2.putText(text, "Series 1  Img 1/1  W:400 L:40", (8, y), cv2.FONT_HERSHEY_PLAIN, H / 500, 255, 1)
    canvas = np.maximum(canvas, text.astype(np.float32) / 255.0 * 0.9)
    for i in range(6):
        cv2.rectangle(canvas, (W // 8 + i * W // 14, 6), (W // 8 + i * W // 14 + W // 20, H // 14), 0.7, 2)
    return canvas


CORRUPTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "collimated": collimated,
    "zoomed": zoomed,
    "washed-out": washed_out,
    "dark": dark,
    "nearly-blank": nearly_blank,
    "screenshot": screenshot,
}
