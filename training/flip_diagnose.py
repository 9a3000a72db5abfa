"""Why does the shipped ``flip`` model flag clean films of a hospital it never saw? (issue 10, bimcv-covid19)

``python -m filmgate_training.flip_diagnose [--source bimcv-covid19] [--films 300]`` runs the shipped model
(``models/flip``) as the gate feeds it and prints, for the held-out source, how many clean films and mirror images
are flagged at several thresholds and the flagged films' scores; then, on adult sources it did train on, whether the
copies that source went through move the false flags: a 224 px square JPEG copy (what bimcv-covid19's films are),
the source's side markers burned in, the corners of the flagged films covered. A cause is what moves them. The
findings are in training/reports/flip-hospitals.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from filmgate.decode import decode_file
from filmgate.manifest import load_manifest
from filmgate.preprocess import preprocess
from filmgate_training.augment import jpeg
from filmgate_training.config import REPO_ROOT
from filmgate_training.datasets import LabelledFilm
from filmgate_training.evaluate import onnx_runner
from filmgate_training.films import all_rows

Image = np.ndarray


def _films(source: str, n: int | None = None) -> list[LabelledFilm]:
    rows = (r for r in all_rows(()) if r.source == source and r.kind == "frontal-chest")
    films = sorted(rows, key=lambda r: str(r.path))
    return films if n is None else films[:: max(1, len(films) // n)][:n]


def square_jpeg(img: Image, side: int = 224) -> Image:
    """The film as bimcv-covid19's copies are: stretched to a ``side`` px square, JPEG q 90."""
    return jpeg(cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA), 90)


def marker(img: Image, text: str, right: bool) -> Image:
    """A side marker as bimcv-covid19 burns it: light letters on a grey box near a top corner."""
    out = np.ascontiguousarray(img, dtype=np.float32).copy()
    h, w = out.shape
    scale = max(h, w) / 448
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x, y = (int(w - tw - 0.03 * w) if right else int(0.03 * w)), int(0.12 * h)
    out[max(0, y - th - 3) : y + 4, max(0, x - 3) : x + tw + 3] = 0.45
    mask = np.zeros((h, w), np.uint8)
    cv2.putText(mask, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, max(1, int(scale)), cv2.LINE_AA)
    alpha = mask.astype(np.float32) / 255.0
    return out * (1.0 - alpha) + np.float32(0.95) * alpha


def cover_corners(img: Image) -> Image:
    """The four corners (a quarter of the width, 15% of the height) filled with the film's median: markers gone."""
    out = img.copy()
    h, w = out.shape
    for rows in (slice(0, int(0.15 * h)), slice(int(0.85 * h), h)):
        for cols in (slice(0, int(0.25 * w)), slice(int(0.75 * w), w)):
            out[rows, cols] = np.median(img)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="bimcv-covid19")
    ap.add_argument("--films", type=int, default=300, help="films per trained-on source for the copy experiments")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    folder = REPO_ROOT / "models" / "flip"
    manifest = load_manifest(folder)
    run = onnx_runner(Path(folder / manifest.file), args.threads)

    def flipped(imgs: Sequence[Image]) -> np.ndarray:
        out = []
        for i in range(0, len(imgs), 128):
            o = run(np.stack([preprocess(m, manifest.preprocessing) for m in imgs[i : i + 128]])).astype(np.float64)
            p = np.exp(o - o.max(axis=1, keepdims=True))
            out.append(p[:, 1] / p.sum(axis=1))
        return np.concatenate(out)

    films = _films(args.source)
    pixels = [decode_file(f.path).pixels for f in films]
    clean, mirrored = flipped(pixels), flipped([p[:, ::-1] for p in pixels])
    shapes = sorted({p.shape for p in pixels})
    print(f"{args.source}: {len(films)} clean films, shapes {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
    for t in (manifest.threshold, 0.7, 0.9, 0.99):
        caught = int((mirrored >= t).sum())
        print(f"  threshold {t:.2f}: clean flagged {int((clean >= t).sum())}, mirrored caught {caught}")
    flagged = np.where(clean >= manifest.threshold)[0]
    print(f"  flagged: {len(flagged)}; their mirror image also flagged: {int((mirrored[flagged] >= 0.5).sum())}")
    for i in flagged[np.argsort(-clean[flagged])]:
        print(f"    {films[i].path.name}: film {clean[i]:.3f}, its mirror {mirrored[i]:.3f}")
    covered = flipped([cover_corners(pixels[i]) for i in flagged]) if len(flagged) else np.zeros(0)
    print(f"  flagged films with the four corners covered: still flagged {int((covered >= 0.5).sum())}/{len(flagged)}")
    copies: dict[str, Callable[[Image], Image]] = {
        "as stored": lambda m: m, "224 px square, JPEG q90": square_jpeg,
        "'D' marker top left": lambda m: marker(m, "D", False), "'DCHA' top right": lambda m: marker(m, "DCHA", True),
    }  # fmt: skip
    for source in ("tbx11k", "nih-cxr14", "chexpert", "hannover"):
        px = [decode_file(f.path).pixels for f in _films(source, args.films)]
        cells = []
        for name, fn in copies.items():
            a, b = flipped([fn(m) for m in px]), flipped([fn(m)[:, ::-1] for m in px])
            cells.append(f"{name}: clean {int((a >= 0.5).sum())}/{len(px)}, mirrored {int((b >= 0.5).sum())}/{len(px)}")
        print(f"{source}: " + "; ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
