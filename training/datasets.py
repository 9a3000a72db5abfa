"""Where the real films live (``FILMGATE_DATA``, default ``../shared/data`` beside the checkout) and their labels.

Tests, benchmarks and training read images from there through this one setting; nothing is copied into the repo.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_VAR = "FILMGATE_DATA"


def data_root() -> Path:
    """The data folder: ``$FILMGATE_DATA``, else ``../shared/data`` beside the checkout (or the working folder)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    for base in (REPO_ROOT, Path.cwd()):
        candidate = (base / ".." / "shared" / "data").resolve()
        if (candidate / "labels.csv").is_file():
            return candidate
    return (REPO_ROOT / ".." / "shared" / "data").resolve()


@dataclass(frozen=True)
class LabelledFilm:
    """One row of ``labels.csv``; ``path`` is absolute."""

    path: Path
    source: str
    kind: str
    view: str
    body_part: str
    modality: str
    age: float | None
    pediatric: str  # "yes", "no" or ""
    patient: str
    split: str
    licence: str
    resized_from: str

    @property
    def rel(self) -> str:
        return str(self.path.relative_to(data_root()))


@lru_cache(maxsize=4)
def _read_labels(root: str) -> tuple[LabelledFilm, ...]:
    rows = []
    with open(Path(root) / "labels.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            try:
                age = float(r["age"]) if r.get("age") else None
            except ValueError:
                age = None
            rows.append(
                LabelledFilm(
                    path=Path(root) / r["path"],
                    source=r["source"],
                    kind=r["kind"],
                    view=r.get("view", ""),
                    body_part=r.get("body_part", ""),
                    modality=r.get("modality", ""),
                    age=age,
                    pediatric=r.get("pediatric", ""),
                    patient=r.get("patient", ""),
                    split=r["split"],
                    licence=r.get("licence", ""),
                    resized_from=r.get("resized_from", ""),
                )
            )
    return tuple(rows)


def labels(root: Path | None = None) -> tuple[LabelledFilm, ...]:
    """All rows of ``labels.csv`` under ``root`` (default :func:`data_root`)."""
    return _read_labels(str(root or data_root()))


def select(
    *, split: str | None = None, kind: str | None = None, source: str | None = None, root: Path | None = None
) -> list[LabelledFilm]:
    """Rows filtered by split, kind and source (None means any)."""
    return [
        r
        for r in labels(root)
        if (split is None or r.split == split)
        and (kind is None or r.kind == kind)
        and (source is None or r.source == source)
    ]
