"""Fixtures of the sweep tests (their helpers are in tests/helpers.py, the one module tests import helpers from)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.fileset import FileSet

from filmgate_training.datasets import select
from tests import hostile
from tests.helpers import film_pixels, make_dicom, read_csv, run_sweep


def _films(per_kind: int) -> list[Path]:
    """A fixed, varied set of real films: each kind of film of the val split, at most two of a source."""
    chosen: list[Path] = []
    for kind in ("frontal-chest", "lateral-chest", "other-radiograph", "not-radiograph"):
        per_source: dict[str, int] = {}
        for f in select(split="val", kind=kind):
            if per_source.get(f.source, 0) < 2:
                per_source[f.source] = per_source.get(f.source, 0) + 1
                chosen.append(f.path)
            if sum(per_source.values()) >= per_kind:
                break
    return chosen


@pytest.fixture(scope="session")
def film_tree(tmp_path_factory, data_dir) -> dict:
    """The tree, and what each of its files is: ``films`` (results path -> kind), ``truncated`` paths."""
    root = tmp_path_factory.mktemp("sweep") / "dataset"
    films: dict[str, str] = {}
    for i, src in enumerate(_films(9)):
        sub = ("chest/2024/a", "chest/2024/b", "other", "chest")[i % 4]
        dst = root / sub / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        films[f"{sub}/{src.name}"] = "image"
    # The real DICOM test files, without their extension, in a nested folder.
    for i, src in enumerate(sorted((data_dir / "dicom").glob("*.dcm"))):
        dst = root / "dicom" / "real" / f"IM{i:04d}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        films[f"dicom/real/IM{i:04d}"] = "dicom"
    # DX films made from real films: two with .dcm, two with no extension, and a rotated one.
    frontal = [f.path for f in select(split="val", kind="frontal-chest") if f.pediatric == "no"][:3]
    for i, src in enumerate(frontal):
        px = film_pixels(src)
        name = f"made/dx{i}.dcm" if i % 2 == 0 else f"made/DX{i}"
        (root / "made").mkdir(exist_ok=True)
        make_dicom(px, root / name)
        films[name] = "dicom"
    make_dicom(np.ascontiguousarray(np.rot90(film_pixels(frontal[0]))), root / "made" / "ROT1")
    films["made/ROT1"] = "dicom"
    # A DICOMDIR and the extension-less files it references (pydicom's FileSet writes both).
    fs = FileSet()
    staging = tmp_path_factory.mktemp("staging")
    for i, src in enumerate(frontal[:2]):
        make_dicom(film_pixels(src), staging / f"s{i}.dcm", study_uid="1.2.826.0.1.3680043.8.498.1")
        ds = dcmread(staging / f"s{i}.dcm")
        ds.StudyTime, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "101500", "1", 1, i + 1  # DICOMDIR records
        fs.add(ds)
    fs.write(root / "archive")
    for p in sorted((root / "archive").rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and p.name != "DICOMDIR":
            films[rel] = "dicom"
    # Not films: a text file and an empty file; broken films: truncated DICOM and JPEG.
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("scanned at site A\n")
    (root / "notes" / "empty.dat").write_bytes(b"")
    whole = (root / "made" / "dx0.dcm").read_bytes()
    (root / "broken").mkdir()
    (root / "broken" / "truncated.dcm").write_bytes(whole[: len(whole) // 2])
    jpg = next(p for p in (root / "chest").rglob("*.jpg"))
    (root / "broken" / "truncated.jpg").write_bytes(jpg.read_bytes()[:300])
    films["broken/truncated.dcm"] = "dicom"
    films["broken/truncated.jpg"] = "image"
    # Hostile films: RLE data that makes the decoder panic, a JPEG 2000 declaring 60000 x 60000 pixels.
    hostile.panicking_rle(root / "broken" / "PANIC")
    hostile.j2k_declaring(root / "broken" / "lying.dcm", 60000, 60000, header_too=True)
    films["broken/PANIC"] = films["broken/lying.dcm"] = "dicom"
    broken = {"broken/truncated.dcm", "broken/truncated.jpg", "broken/PANIC", "broken/lying.dcm"}
    return {"root": root, "films": films, "truncated": broken}


@pytest.fixture(scope="session")
def swept(film_tree, tmp_path_factory) -> dict:
    """``filmgate sweep TREE --out OUT --sort-into SORTED`` run once; its outputs read back."""
    base = tmp_path_factory.mktemp("swept")
    out, sorted_dir = base / "out", base / "sorted"
    proc = run_sweep(film_tree["root"], "--out", out, "--sort-into", sorted_dir)
    return {"out": out, "sorted": sorted_dir, "rows": read_csv(out / "results.csv"), "stderr": proc.stderr,
            "summary": json.loads((out / "summary.json").read_text())}  # fmt: skip
