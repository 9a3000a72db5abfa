"""Realism augmentations on decoded films (float32 HxW in [0, 1], white = dense as displayed).

Synthetic labels are only honest if the model cannot tell a transformed film from an untouched one by anything but
the property being learned. So the *film* augmentations (crop, zoom, aspect, tilt, borders, collimation, burned-in
markers) run before the label transform and turn with it, and the *display* augmentations (window, gamma, contrast,
noise, blur, overlay text, padding; then the copy a film went through: screenshot, photograph, low-resolution copy,
JPEG) run after it, on every class alike. Nothing here knows about labels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # annotations only: the config imports the task registry, which imports this module
    from filmgate_training.config import AugmentConfig

_WORDS = (
    "R", "L", "AP", "PA", "AP PORTABLE", "SUPINE", "ERECT", "PORTABLE", "UPRIGHT", "SEMI-ERECT", "LEFT", "RIGHT",
    "1", "2", "12:04", "CHEST", "INSP", "EXP", "ROOM 4", "L", "R",
    "D", "I", "DCHA", "IZDA", "PORTATIL", "Bipe", "Decubito", "G", "DX", "SX",  # Spanish, German, Italian markers
)  # fmt: skip
_SCREEN_TEXT = ("Series 1  Img 1/1", "W:400 L:40", "Zoom 100%", "1/1", "ST 2.0mm", "WL 2048/4096")
_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_COMPLEX)


def film_augment(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """What differs between real films themselves: geometry, borders, collimation, burned-in markers."""
    if rng.random() < cfg.p_crop:
        img = random_crop(img, rng, cfg.crop_min_side)
    if rng.random() < cfg.p_aspect:
        img = stretch(img, rng, cfg.aspect_max)
    if rng.random() < cfg.p_tilt:
        img = tilt(img, rng, cfg.tilt_degrees)
    if rng.random() < cfg.p_collimation:
        img = collimate(img, rng)
    if rng.random() < cfg.p_border:
        img = border(img, rng, cfg.border_max)
    if rng.random() < cfg.p_text_film:
        img = burn_text(img, rng)
    return img


def display_augment(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """What differs in how a film is displayed or passed on: window, gamma, contrast, noise, blur, overlays."""
    if rng.random() < cfg.p_window:
        img = window(img, rng, cfg.window_clip_max)
    if rng.random() < cfg.p_gamma:
        g = float(np.exp(rng.uniform(-np.log(cfg.gamma_max), np.log(cfg.gamma_max))))
        img = np.power(np.clip(img, 0.0, 1.0), g, dtype=np.float32)
    if rng.random() < cfg.p_contrast:
        mid = float(img.mean())
        img = np.clip((img - mid) * rng.uniform(0.6, 1.4) + mid + rng.uniform(-0.1, 0.1), 0.0, 1.0)
    if rng.random() < cfg.p_blur:
        k = int(rng.choice([3, 5]))
        img = cv2.GaussianBlur(img, (k, k), 0)
    if rng.random() < cfg.p_noise:
        img = img + rng.normal(0.0, rng.uniform(0.0, cfg.noise_max), img.shape).astype(np.float32)
        img = np.clip(img, 0.0, 1.0)
    if rng.random() < cfg.p_text_overlay:
        img = burn_text(img, rng)
    if rng.random() < cfg.p_pad:
        img = pad(img, rng)
    return copy_augment(img, rng, cfg).astype(np.float32, copy=False)


def copy_augment(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """What another hospital's copy of a film went through on its way here: screenshot or photograph of a viewer,
    a low-resolution copy (the gate enlarges it again), JPEG recompression. Last, as in life: the copy is made of the
    film as displayed. All probabilities 0 by default (the detectors trained before these existed)."""
    if rng.random() < cfg.p_screenshot:
        img = screenshot(img, rng)
    elif rng.random() < cfg.p_photo:
        img = photograph(img, rng)
    if rng.random() < cfg.p_low_res:
        img = low_resolution(img, rng, cfg.low_res_min, cfg.low_res_max)
    if rng.random() < cfg.p_jpeg:
        img = jpeg(img, int(rng.integers(cfg.jpeg_quality_min, cfg.jpeg_quality_max + 1)))
    return img


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Re-encoded as 8-bit grey JPEG at ``quality`` (blocking, ringing and 8-bit steps of a public copy)."""
    ok, buf = cv2.imencode(
        ".jpg", np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    decoded = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) if ok else None
    return img if decoded is None else decoded.astype(np.float32) / 255.0


def low_resolution(img: np.ndarray, rng: np.random.Generator, low: int, high: int) -> np.ndarray:
    """A small copy (long side ``low``-``high`` px; stretched to a square a third of the time, as bimcv-covid19's
    224 px copies are), left small: the gate's preprocessing enlarges it, as it does a small film that arrives."""
    h, w = img.shape
    side = int(rng.integers(low, high + 1))
    if side >= max(h, w):
        return img
    if rng.random() < 1 / 3:
        size = (side, side)
    else:
        scale = side / max(h, w)
        size = (max(8, round(w * scale)), max(8, round(h * scale)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def screenshot(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The film inside a viewer's window: a dark canvas a little wider than the film, a tool bar and side panel
    in grey, a line or two of overlay text; the film keeps 65-90% of the canvas height."""
    h, w = img.shape
    fill = float(rng.uniform(0.65, 0.9))
    H = max(h, int(h / fill))  # noqa: N806
    W = max(w + 8, int(H * rng.uniform(1.0, 1.78)))  # noqa: N806
    canvas = np.full((H, W), float(rng.uniform(0.0, 0.2)), np.float32)
    bar = int(H * rng.uniform(0.03, 0.08))
    canvas[:bar] = float(rng.uniform(0.25, 0.45))
    top = int(rng.integers(bar, max(bar + 1, H - h + 1)))
    left = int(rng.integers(0, max(1, W - w + 1)))
    canvas[top : top + h, left : left + w] = img[: H - top, : W - left]
    mask = np.zeros((H, W), np.uint8)  # OpenCV draws text on 8-bit images only
    for i in range(int(rng.integers(1, 4))):
        y = bar + (i + 1) * max(8, H // 24)
        cv2.putText(mask, str(rng.choice(_SCREEN_TEXT)), (4, y), cv2.FONT_HERSHEY_PLAIN, max(0.4, H / 600), 255, 1)
    return np.maximum(canvas, mask.astype(np.float32) / 255.0 * 0.85)


def photograph(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A photograph of the film on a light box or screen: a mild perspective, a dark surround, uneven light
    (vignette), soft focus and sensor noise."""
    h, w = img.shape
    d = 0.08 * min(h, w)
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float32)
    dst = (src + rng.uniform(-d, d, src.shape)).astype(np.float32)
    dst -= dst.min(axis=0)
    size = (int(dst[:, 0].max()) + 1, int(dst[:, 1].max()) + 1)
    warped = cv2.warpPerspective(img, cv2.getPerspectiveTransform(src, dst), size, flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=float(rng.uniform(0.0, 0.15)))  # fmt: skip
    hh, ww = warped.shape
    yy, xx = np.mgrid[0:hh, 0:ww].astype(np.float32)
    cy, cx = hh * rng.uniform(0.3, 0.7), ww * rng.uniform(0.3, 0.7)
    r2 = ((yy - cy) / hh) ** 2 + ((xx - cx) / ww) ** 2
    out = warped * (1.0 - float(rng.uniform(0.1, 0.5)) * r2 / r2.max())
    out = cv2.GaussianBlur(out, (3, 3), float(rng.uniform(0.3, 1.2)))
    out = out + rng.normal(0.0, float(rng.uniform(0.005, 0.03)), out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def random_crop(img: np.ndarray, rng: np.random.Generator, min_side: float) -> np.ndarray:
    h, w = img.shape
    ch = int(round(h * rng.uniform(min_side, 1.0)))
    cw = int(round(w * rng.uniform(min_side, 1.0)))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return img[top : top + ch, left : left + cw]


def stretch(img: np.ndarray, rng: np.random.Generator, aspect_max: float) -> np.ndarray:
    h, w = img.shape
    f = float(np.exp(rng.uniform(-np.log(aspect_max), np.log(aspect_max))))
    nh, nw = (max(8, round(h * f)), w) if rng.random() < 0.5 else (h, max(8, round(w * f)))
    return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)


def tilt(img: np.ndarray, rng: np.random.Generator, degrees: float) -> np.ndarray:
    """Rotate by a small angle (a film placed askew); the exposed corners are black, white or the edge."""
    h, w = img.shape
    angle = float(rng.uniform(-degrees, degrees))
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0)
    mode = rng.integers(0, 3)
    if mode == 2:
        return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return cv2.warpAffine(
        img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=float(mode)
    )


def collimate(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shutter the edges: outside a rectangle the film is flat (white = unexposed, or black = electronic shutter)."""
    h, w = img.shape
    out = img.copy()
    value = float(rng.choice([0.0, 1.0, rng.uniform(0.6, 1.0)]))
    t, b = int(h * rng.uniform(0, 0.15)), int(h * rng.uniform(0, 0.15))
    left, r = int(w * rng.uniform(0, 0.15)), int(w * rng.uniform(0, 0.15))
    out[:t, :] = value
    out[h - b :, :] = value
    out[:, :left] = value
    out[:, w - r :] = value
    return out


def border(img: np.ndarray, rng: np.random.Generator, border_max: float) -> np.ndarray:
    """A frame on some sides (scanner edges, film holders)."""
    h, w = img.shape
    value = float(rng.choice([0.0, 1.0, rng.uniform(0.0, 1.0)]))
    top, bottom, left, right = [int(s * rng.uniform(0, border_max)) if rng.random() < 0.6 else 0 for s in (h, h, w, w)]
    return cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=value)


def pad(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Padding added by other software to make a film square-ish (uniform black or white bars)."""
    h, w = img.shape
    value = float(rng.choice([0.0, 1.0]))
    extra = int(max(h, w) * rng.uniform(0.05, 0.3))
    if rng.random() < 0.5:
        return cv2.copyMakeBorder(img, extra // 2, extra - extra // 2, 0, 0, cv2.BORDER_CONSTANT, value=value)
    return cv2.copyMakeBorder(img, 0, 0, extra // 2, extra - extra // 2, cv2.BORDER_CONSTANT, value=value)


def window(img: np.ndarray, rng: np.random.Generator, clip_max: float) -> np.ndarray:
    lo = rng.uniform(0.0, clip_max)
    hi = 1.0 - rng.uniform(0.0, clip_max)
    return np.clip((img - lo) / max(hi - lo, 1e-3), 0.0, 1.0).astype(np.float32)


def burn_text(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One to three markers or labels (white or black, sometimes on a box), at random places and sizes."""
    out = np.ascontiguousarray(img, dtype=np.float32).copy()
    h, w = out.shape
    for _ in range(int(rng.integers(1, 4))):
        text = str(rng.choice(_WORDS))
        font = int(rng.choice(_FONTS))
        scale = max(h, w) / 400.0 * rng.uniform(0.5, 2.0)
        thick = max(1, int(round(scale * rng.uniform(1.0, 2.5))))
        (tw, th), _ = cv2.getTextSize(text, font, scale, thick)
        x = int(rng.integers(0, max(1, w - tw)))
        y = int(rng.integers(th, max(th + 1, h)))
        value = float(rng.choice([1.0, 0.0, rng.uniform(0.7, 1.0)]))
        if rng.random() < 0.2:
            out[max(0, y - th - 2) : y + 4, max(0, x - 2) : x + tw + 2] = 1.0 - value
        mask = np.zeros((h, w), dtype=np.uint8)  # OpenCV draws text on 8-bit images only: draw a mask, blend it
        cv2.putText(mask, text, (x, y), font, scale, 255, thick, cv2.LINE_AA)
        alpha = mask.astype(np.float32) / 255.0
        out = out * (1.0 - alpha) + np.float32(value) * alpha
    return out
