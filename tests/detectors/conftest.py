"""Shared helpers for the detector tests: the shipped models, a fixed val subset, and real-film inference.

Films are read from the data folder (``filmgate.datasets.data_root``) and go through the gate's own decode and
preprocessing, then through the gate's judge: the tests check what the gate will actually compute.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from filmgate.datasets import LabelledFilm, select
from filmgate.decode import decode_file
from tests.helpers import MODELS, ShippedDetector

DETECTORS = ("flip", "view", "pediatric", "atypical")


def val_subset(kind: str, per_source: int, sources: tuple[str, ...] | None = None) -> list[LabelledFilm]:
    """A fixed subset of ``val`` films of one kind: every k-th film of each source, in path order (no randomness)."""
    by_source: dict[str, list[LabelledFilm]] = defaultdict(list)
    for film in select(split="val", kind=kind):
        if sources is None or film.source in sources:
            by_source[film.source].append(film)
    out = []
    for _, films in sorted(by_source.items()):
        films.sort(key=lambda f: str(f.path))
        step = max(1, len(films) // per_source)
        out.extend(films[::step][:per_source])
    return out


_PIXELS: dict[Path, np.ndarray] = {}


def pixels(film: LabelledFilm | Path) -> np.ndarray:
    """Decoded film (memoised for the test session: several tests look at the same films)."""
    path = film if isinstance(film, Path) else film.path
    if path not in _PIXELS:
        _PIXELS[path] = decode_file(path).pixels
    return _PIXELS[path]


@pytest.fixture(scope="session")
def detector():
    """``detector(name)``: the shipped model of that name, judged by the gate's judge; a missing model is a failure,
    not a skip."""
    cache: dict[str, ShippedDetector] = {}

    def get(name: str) -> ShippedDetector:
        if name not in cache:
            cache[name] = ShippedDetector(name, MODELS)
        return cache[name]

    return get
