"""Shared helpers for the detector tests: the shipped models, a fixed val subset, and real-film inference.

Films are read from the data folder (``filmgate.datasets.data_root``) and go through the gate's own decode and
preprocessing, then through onnxruntime: the tests check what the gate will actually compute.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from filmgate.datasets import LabelledFilm, select
from filmgate.decode import decode_file
from filmgate.manifest import ModelManifest, load_manifest
from filmgate.preprocess import preprocess_batch

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
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


class Detector:
    """One shipped model, run the way the gate runs it (manifest preprocessing, onnxruntime on CPU)."""

    def __init__(self, name: str):
        self.folder = MODELS / name
        self.manifest: ModelManifest = load_manifest(self.folder)  # also checks the sha256
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        self.session = ort.InferenceSession(
            str(self.folder / self.manifest.file), opts, providers=["CPUExecutionProvider"]
        )

    def outputs(self, images: list[np.ndarray]) -> np.ndarray:
        batch = preprocess_batch(images, self.manifest.preprocessing)
        out = []
        for i in range(0, len(batch), 64):
            out.append(self.session.run([self.manifest.output_name], {self.manifest.input_name: batch[i : i + 64]})[0])
        return np.concatenate(out)

    def scores(self, images: list[np.ndarray]) -> np.ndarray:
        return self.manifest.scores(self.outputs(images))

    def flagged(self, images: list[np.ndarray]) -> np.ndarray:
        return self.scores(images) >= self.manifest.threshold


_PIXELS: dict[Path, np.ndarray] = {}


def pixels(film: LabelledFilm | Path) -> np.ndarray:
    """Decoded film (memoised for the test session: several tests look at the same films)."""
    path = film if isinstance(film, Path) else film.path
    if path not in _PIXELS:
        _PIXELS[path] = decode_file(path).pixels
    return _PIXELS[path]


@pytest.fixture(scope="session")
def detector():
    """``detector(name)``: the shipped model of that name; a missing model is a failure, not a skip."""
    cache: dict[str, Detector] = {}

    def get(name: str) -> Detector:
        if name not in cache:
            assert (MODELS / name / "manifest.json").is_file(), f"models/{name} is not shipped"
            cache[name] = Detector(name)
        return cache[name]

    return get
