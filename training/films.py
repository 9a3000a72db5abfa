"""Films beyond labels.csv: folders of PNG/JPEG/DICOM files added as rows, and one id per film.

``data.folders`` in a config adds every film under a folder (recursively) with the source, kind and split given
there, e.g. another hospital's frontal films for the self-supervised tasks. A film's id is its path relative to
the data root when it lives there (as in labels.csv), else its absolute path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from filmgate.decode import IMAGE_SUFFIXES
from filmgate_training.datasets import LabelledFilm, data_root, labels

FILM_SUFFIXES = (*IMAGE_SUFFIXES, ".dcm", ".dicom")


def film_id(film: LabelledFilm) -> str:
    try:
        return str(Path(film.path).relative_to(data_root()))
    except ValueError:
        return str(Path(film.path).resolve())


def scan_folder(
    path: str | Path, source: str, kind: str, split: str, licence: str = "", pediatric: str = ""
) -> list[LabelledFilm]:
    """Every film file under ``path`` (by suffix: PNG, JPEG, BMP, TIFF, WebP, DICOM) as a row."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data.folders: {root} is not a folder")
    return [
        LabelledFilm(
            path=p,
            source=source,
            kind=kind,
            view="",
            body_part="",
            modality="",
            age=None,
            pediatric=pediatric,
            patient="",
            split=split,
            licence=licence,
            resized_from="",
        )
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix.lower() in FILM_SUFFIXES
    ]


def all_rows(folders: Sequence[object] = ()) -> list[LabelledFilm]:
    """labels.csv plus the configured folders (``DataConfig.folders``)."""
    rows = list(labels())
    for f in folders:
        rows += scan_folder(f.path, f.source, f.kind, f.split, f.licence, f.pediatric)  # type: ignore[attr-defined]
    return rows
