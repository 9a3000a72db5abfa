"""Decoded, reduced films kept on disk so that training epochs never decode again.

Every film goes through :func:`filmgate.decode.decode_file` (the gate's own pipeline) and is then reduced so that its
long side is at most ``long_side`` (INTER_AREA, aspect kept, never enlarged). Augmentation and
:func:`filmgate.preprocess.preprocess` run on these arrays at training time. The cache is one ``.npz`` per
(film list, long side): float16 pixels concatenated, with offsets and shapes, keyed by the films' relative paths and
file sizes so that a changed data folder builds a new cache instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from filmgate.decode import DecodeError, decode_file
from filmgate_training.datasets import LabelledFilm, data_root
from filmgate_training.films import film_id

log = logging.getLogger(__name__)


def reduce_film(pixels: np.ndarray, long_side: int) -> np.ndarray:
    """Reduce a decoded film so its long side is at most ``long_side`` (aspect kept, never enlarged)."""
    h, w = pixels.shape
    scale = long_side / max(h, w)
    if scale >= 1.0:
        return pixels.astype(np.float32, copy=False)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(pixels.astype(np.float32, copy=False), size, interpolation=cv2.INTER_AREA)


def _decode_one(args: tuple[str, int]) -> tuple[np.ndarray | None, str]:
    path, long_side = args
    try:
        return reduce_film(decode_file(path).pixels, long_side).astype(np.float16), ""
    except DecodeError as exc:
        return None, str(exc)


@dataclass
class FilmCache:
    """Films (float16, long side <= ``long_side``) addressed by index; ``rel[i]`` is the film's path in the data."""

    rel: list[str]
    shapes: np.ndarray  # (N, 2) int32
    offsets: np.ndarray  # (N + 1,) int64
    data: np.ndarray  # float16, all films concatenated
    long_side: int

    def __len__(self) -> int:
        return len(self.rel)

    def image(self, i: int) -> np.ndarray:
        """Film ``i`` as float32 HxW in [0, 1]."""
        h, w = self.shapes[i]
        return self.data[self.offsets[i] : self.offsets[i + 1]].reshape(h, w).astype(np.float32)

    def index(self) -> dict[str, int]:
        return {r: i for i, r in enumerate(self.rel)}


def cache_key(films: Sequence[LabelledFilm], long_side: int) -> str:
    digest = hashlib.sha1(f"v1:{long_side}".encode())
    for film in sorted(films, key=lambda f: str(f.path)):
        try:
            size = film.path.stat().st_size
        except OSError:
            size = -1
        digest.update(f"{film_id(film)}:{size}\n".encode())
    return digest.hexdigest()[:16]


def build_cache(
    films: Sequence[LabelledFilm], long_side: int, cache_dir: Path, workers: int = 2, progress: bool = False
) -> FilmCache:
    """Load the cache for ``films`` or build it (decoding each once); films that fail to decode are left out."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"films-{long_side}-{cache_key(films, long_side)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return FilmCache(
                rel=[str(r) for r in z["rel"]],
                shapes=z["shapes"],
                offsets=z["offsets"],
                data=z["data"],
                long_side=int(z["long_side"]),
            )
    ordered = sorted(films, key=lambda f: str(f.path))
    jobs = [(str(f.path), long_side) for f in ordered]
    if workers > 1 and len(jobs) > 64:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_decode_one, jobs, chunksize=32))
    else:
        results = [_decode_one(j) for j in jobs]
    rel, arrays, shapes = [], [], []
    for film, (arr, error) in zip(ordered, results, strict=True):
        if arr is None:
            log.warning("left out of the cache (cannot decode): %s: %s", film_id(film), error)
            continue
        rel.append(film_id(film))
        arrays.append(arr.reshape(-1))
        shapes.append(arr.shape)
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([a.size for a in arrays])
    data = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.float16)
    cache = FilmCache(rel, np.asarray(shapes, dtype=np.int32).reshape(-1, 2), offsets, data, long_side)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, rel=np.asarray(rel), shapes=cache.shapes, offsets=offsets, data=data, long_side=long_side)
    os.replace(tmp, path)
    log.info("cached %d films (long side %d) in %s", len(rel), long_side, path)
    return cache


def relative(film: LabelledFilm) -> str:
    """The film's path relative to the data root (what the cache is keyed by)."""
    return str(Path(film.path).relative_to(data_root()))
